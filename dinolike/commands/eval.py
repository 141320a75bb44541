"""`dinolike eval knn|linear|logreg ...` (also `python -m eval ...` from a checkout): parse the flags, build
the job's config (`dinolike.eval.config.job_config`), call the protocol (`dinolike.eval.protocols`).

Every flag sets one key of the eval schema (configs/eval/base.yaml), where its default lives: the parser
gives None for a flag that is not on the command line, and the schema's value stands.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from typing import Any

from omegaconf import DictConfig

from dinolike.commands.parsing import RaisingParser
from dinolike.config import ConfigError
from dinolike.data.datasets import DATASET_SPEC_HELP

PROTOCOLS = {
    "knn": "weighted kNN on frozen features",
    "linear": "linear probe on frozen features (grid of learning rates)",
    "logreg": "logistic regression on frozen features (sweep of C)",
}
DESCRIPTIONS = {
    "knn": "Weighted kNN classification on frozen backbone features.",
    "linear": "DINOv2-style linear probe (grid of heads; best chosen on a held-out split of train).",
    "logreg": "Logistic regression on frozen features, sweeping C.",
}
# `python -m eval plot|viz` still runs them, but they are not protocols: help lists them as the commands
# they are, `dinolike plot` and `dinolike viz`
COMMANDS = (*PROTOCOLS, "plot", "viz")


def build_parser(protocol: str = "knn", parser: type[argparse.ArgumentParser] = argparse.ArgumentParser
                 ) -> argparse.ArgumentParser:
    """The flags every protocol takes; each sets the `eval.` key of the same name (see the schema)."""
    p = parser(prog=f"dinolike eval {protocol}", description=DESCRIPTIONS[protocol])
    p.add_argument(
        "--pretrained",
        required=parser is argparse.ArgumentParser,
        help="checkpoint (training ckpt, exported or official DINOv2 backbone .pth), a run folder (its "
        "teacher_backbone.pth), 'pixels' (raw-pixel baseline) or 'random' (randomly initialised model of --config)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="run config YAML or arch preset (vit_small, ...); default: config.yaml next to the checkpoint",
    )
    p.add_argument("--which", choices=["teacher", "student"], help="weights in a ckpt (default: teacher)")
    p.add_argument("--train-dataset", help=f"labelled train set (default: fmnist:train): {DATASET_SPEC_HELP}")
    p.add_argument("--val-dataset", help=f"labelled evaluation set (default: fmnist:test): {DATASET_SPEC_HELP}")
    p.add_argument("--limit-train", type=int, help="use only the first N train items")
    p.add_argument("--limit-val", type=int, help="use only the first N eval items")
    p.add_argument("--train-fraction", type=float,
                   help="few labels: keep this fraction of each class's labelled train images (e.g. 0.01)")
    p.add_argument("--shots", type=int, help="few labels: keep N labelled train images per class")
    p.add_argument("--label-seeds", type=int,
                   help="few labels: number of seeded splits (seeds 0..N-1, default 3); mean and spread are reported")
    p.add_argument("--output-dir", help="where results.json/results.md go")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--cache-dir", help="feature cache (default: $DINOLIKE_FEATURE_CACHE or ~/.cache/dinolike/features)")
    p.add_argument("--no-cache", action="store_true", help="always re-extract features")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("opts", nargs="*", default=[], help="omegaconf overrides, e.g. eval.knn.temperature=0.1")
    return p


def job_keys(args: argparse.Namespace) -> dict[str, Any]:
    """The `eval.` keys the flags set (None: not given, the schema's value stands)."""
    keys = {k: getattr(args, k) for k in ("which", "train_dataset", "val_dataset", "limit_train", "limit_val",
                                          "train_fraction", "shots", "label_seeds", "output_dir", "device",
                                          "cache_dir")}
    keys["cache"] = False if args.no_cache else None
    keys["progress"] = False if args.no_progress else None
    return keys


def config_of(args: argparse.Namespace, extra_opts: list[str] | None = None) -> DictConfig:
    """The checked job config of parsed flags. Raises EvalError."""
    from dinolike.eval.config import job_config

    return job_config(args.pretrained, args.config, [*(extra_opts or []), *args.opts], job_keys(args))


def validate(argv: list[str]) -> None:
    """Check `COMMAND ARGS` without loading a model or any data (what `dinolike submit eval` runs before
    submitting; the protocols run the same checks first themselves). Raises ConfigError."""
    from dinolike.eval.config import EvalError

    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"the eval command must be one of {', '.join(COMMANDS)}, got {' '.join(argv[:1]) or 'none'}")
    if argv[0] not in PROTOCOLS:
        from dinolike.commands import plot, viz

        (plot if argv[0] == "plot" else viz).build_parser(RaisingParser).parse_intermixed_args(argv[1:])
        return
    args = build_parser(argv[0], RaisingParser).parse_intermixed_args(argv[1:])
    if args.pretrained is None:
        raise ConfigError("the following arguments are required: --pretrained")
    try:
        config_of(args)
    except EvalError as e:
        raise ConfigError(str(e)) from None


def usage() -> str:
    lines = "\n".join(f"  {c:<7} {h}" for c, h in PROTOCOLS.items())
    return (f"usage: dinolike eval {{{'|'.join(PROTOCOLS)}}} [ARGS]   (dinolike eval knn --help for its options)"
            f"\n\nprotocols:\n{lines}\n\ntraining curves and PCA pictures: dinolike plot, dinolike viz")


def run_protocol(protocol: str, argv: list[str]) -> int:
    """`dinolike eval PROTOCOL ARGV`: parse, build the config, run; expected failures are one line, exit 2."""
    from dinolike.eval.config import EvalError
    from dinolike.eval.features import FeatureError
    from dinolike.eval.protocols import PROTOCOLS as JOBS

    parser = build_parser(protocol)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        JOBS[protocol](config_of(args))
    except (EvalError, FeatureError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], PROTOCOLS, n=1) if argv else []
        what = f"unknown protocol {argv[0]!r}" if argv else "give a protocol"
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{usage()}\n\ndinolike eval: error: {what}{hint}", file=sys.stderr)
        return 2
    if argv[0] == "plot":
        from dinolike.commands.plot import main as plot_main

        return plot_main(argv[1:])
    if argv[0] == "viz":
        from dinolike.commands.viz import main as viz_main

        return viz_main(argv[1:])
    return run_protocol(argv[0], argv[1:])
