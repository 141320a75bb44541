"""`dinolike curate STEP --config configs/curation/X.yaml [key=value ...]` (`python -m curation ...` in a checkout).

Steps: embed, dedup, retrieve, sample, build, all; plus `demo` that writes a Fashion-MNIST pool with
known duplicates to try the pipeline on. Every step is resumable: rerunning it skips finished work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from omegaconf import DictConfig

from dinolike.commands.parsing import RaisingParser
from dinolike.curation.config import ConfigError, check_config, load_config
from dinolike.curation.steps import STEPS, curate
from dinolike.curation.store import StepOutputError

__all__ = ["build_parser", "main"]


def build_parser(parser: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser(prog="dinolike curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "all", "demo"], help="pipeline step to run")
    p.add_argument("--config", help="pipeline yaml (deltas on configs/curation/base.yaml)")
    p.add_argument("--force", action="store_true", help="recompute dedup/retrieve/sample even if up to date")
    p.add_argument("--demo-out", default="outputs/curation/fmnist_pool", help="demo: output folder")
    p.add_argument("--demo-n", type=int, default=3000, help="demo: Fashion-MNIST train images in the pool")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def config_of(args: argparse.Namespace) -> DictConfig | None:
    """The checked curation config of a parsed command line (None for `demo`). Raises ConfigError."""
    if args.step == "demo":
        return None
    cfg = load_config(args.config, args.overrides)
    check_config(cfg, args.step)
    return cfg


def validate(argv: list[str] | None) -> tuple[argparse.Namespace, DictConfig | None]:
    """The parsed command line and its checked config (None for `demo`), before any work; what `dinolike
    submit curate` runs before submitting. Raises ConfigError, for a malformed line too."""
    args = build_parser(RaisingParser).parse_intermixed_args(argv)
    return args, config_of(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_of(args)
        if cfg is None:
            from dinolike.curation.demo import write_demo_pool

            truth = write_demo_pool(args.demo_out, n_originals=args.demo_n)
            print(json.dumps(truth["counts"]))
            return 0
    except (ConfigError, StepOutputError, ValueError, FileNotFoundError) as e:
        print(f"dinolike curate: error: {args.step}: {e}", file=sys.stderr)
        return 2
    return curate(cfg, args.step, args.force)
