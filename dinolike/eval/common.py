"""Shared plumbing of the eval commands: arguments, config, model + dataset + transform, result files.

Every protocol command (knn, linear, logreg) is `parse -> EvalSetup.from_args -> features -> protocol
-> EvalSetup.finish`, so the three commands accept the same flags and write results the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dinolike.config import BASE, CONFIG_DIR, ConfigError, find_config, load_config, load_schema
from dinolike.data.datasets import DATASET_SPEC_HELP
from dinolike.data.normalize import build_eval_transform, default_stats
from dinolike.eval.features import FeatureError, FeatureSet, dist_info, extract_features

from .feature_cache import cached_features, dataset_fingerprint, path_fingerprint

log = logging.getLogger(__name__)

PIXELS = "pixels"
RANDOM = "random"

# The eval commands' own config section (every key can be set with `eval.<key>=...` on the command line)
SCHEMA = CONFIG_DIR / "eval" / "base.yaml"


class EvalError(Exception):
    """A user-facing problem (bad flag, bad checkpoint, bad dataset): printed without a traceback."""


# ------------------------------------------------------------------------------------------------ args


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags shared by every protocol command."""
    p.add_argument(
        "--pretrained",
        required=True,
        help="checkpoint (training ckpt, exported or official DINOv2 backbone .pth), a run folder (its "
        "teacher_backbone.pth), 'pixels' (raw-pixel baseline) or 'random' (randomly initialised model of --config)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="run config YAML or arch preset (vit_small, ...); default: config.yaml next to the checkpoint",
    )
    p.add_argument("--which", default="teacher", choices=["teacher", "student"], help="weights in a ckpt")
    p.add_argument("--train-dataset", default="fmnist:train", help=f"labelled train set: {DATASET_SPEC_HELP}")
    p.add_argument("--val-dataset", default="fmnist:test", help=f"labelled evaluation set: {DATASET_SPEC_HELP}")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N train items")
    p.add_argument("--limit-val", type=int, default=None, help="use only the first N eval items")
    p.add_argument("--train-fraction", type=float, default=None,
                   help="few labels: keep this fraction of each class's labelled train images (e.g. 0.01)")
    p.add_argument("--shots", type=int, default=None, help="few labels: keep N labelled train images per class")
    p.add_argument("--label-seeds", type=int, default=3,
                   help="few labels: number of seeded splits (seeds 0..N-1); mean and spread are reported")
    p.add_argument("--output-dir", default=None, help="where results.json/results.md go")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache (default: $DINOLIKE_FEATURE_CACHE or ~/.cache/dinolike/features)",
    )
    p.add_argument("--no-cache", action="store_true", help="always re-extract features")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("opts", nargs="*", default=[], help="omegaconf overrides, e.g. eval.knn.temperature=0.1")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> int:
    """Parse, run, and turn expected failures into a one-line error with exit code 2."""
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (EvalError, FeatureError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def probe_headline(result: Mapping[str, Any]) -> dict[str, float]:
    """A probe's headline numbers, averaged over few-label splits."""
    return {"test_top1": result["test_top1"], "test_top5": result["test_top5"]}


# ---------------------------------------------------------------------------------------------- config


def _find_run_config(pretrained: str) -> Path | None:
    """config.yaml of the run a checkpoint came from (runs/X itself, runs/X/teacher_backbone.pth,
    runs/X/checkpoints/..)."""
    p = Path(pretrained).resolve()
    for d in ([p] if p.is_dir() else []) + [p.parent, p.parent.parent]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def resolve_config(pretrained: str, config: str | None, opts: Sequence[str]) -> tuple[DictConfig, bool]:
    """Schema (configs/eval/base.yaml + the training schema) <- run config <- command-line overrides,
    through the strict config loader; returns (config, has_model_config).

    The run config is `--config` (a recipe/run YAML or an arch preset on top of configs/base.yaml), else
    the config.yaml of the run the checkpoint lives in. Without either, a checkpoint's architecture comes
    from the checkpoint itself (has_model_config False; no `model.*` key), and the pixel baseline needs no
    training key at all (only `eval.*`).
    """
    path, preset = None, None
    if config is not None:
        if os.path.isfile(config) or config.endswith((".yaml", ".yml")) or os.sep in config:
            try:  # a file here, or a recipe shipped with dinolike (`--config fmnist_cpu.yaml` from anywhere)
                path = str(find_config(config))
            except ConfigError as e:
                raise EvalError(str(e)) from None
        else:
            preset = config
    elif pretrained not in (PIXELS, RANDOM):
        found = _find_run_config(pretrained)
        path = str(found) if found is not None else None
    has_model = path is not None or preset is not None
    if pretrained == RANDOM and not has_model:
        raise EvalError("--pretrained random needs --config (a run config or an arch preset)")
    if not has_model and pretrained == PIXELS:
        schema = load_schema(SCHEMA)
    else:  # the eval section first: results.json lists its keys before the run's
        schema = load_schema(SCHEMA, BASE)
        if not has_model:
            schema.pop("model")  # the schema's default model says nothing about this checkpoint
    overrides = [f"model.arch={preset}"] if preset else []
    dropped: list[str] = []
    try:
        cfg = load_config(path, [*overrides, *opts], schema=schema, dropped=dropped)
    except ConfigError as e:
        raise EvalError(str(e)) from e
    except Exception as e:  # omegaconf raises its own error types for malformed values
        raise EvalError(f"bad config or override {list(opts)}: {e}") from e
    if dropped:  # evaluating needs the model, data and eval keys, not every training key of its time
        log.warning("%s: ignoring %d key(s) this version does not know (another dinolike version's run?): %s",
                    path, len(dropped), ", ".join(dropped))
    OmegaConf.set_struct(cfg, False)  # load_backbone records the checkpoint's own model section
    return cfg, has_model


def check_args(args: argparse.Namespace) -> tuple[DictConfig, bool]:
    """Everything checkable before a model or an image is loaded (the config and its overrides, the
    dataset specs' syntax), so a typo fails at once and not after the train features were extracted.
    Returns resolve_config's (config, has_model_config)."""
    from dinolike.data.datasets import parse_spec

    fraction, shots = getattr(args, "train_fraction", None), getattr(args, "shots", None)
    if fraction is not None and shots is not None:
        raise EvalError("give --train-fraction or --shots, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise EvalError(f"--train-fraction must be in (0, 1], got {fraction}")
    if shots is not None and shots < 1:
        raise EvalError(f"--shots must be >= 1, got {shots}")
    if getattr(args, "label_seeds", 1) < 1:
        raise EvalError(f"--label-seeds must be >= 1, got {args.label_seeds}")
    resolved = resolve_config(args.pretrained, args.config, args.opts)
    for flag, spec in (("--train-dataset", args.train_dataset), ("--val-dataset", args.val_dataset)):
        try:
            parse_spec(spec)
        except ValueError as e:
            raise EvalError(f"{flag}: {e}") from None
    return resolved


def _cfg_get(cfg: DictConfig, dotted: str, default: Any = None) -> Any:
    val = OmegaConf.select(cfg, dotted, default=default)
    return default if val is None else val


def data_stats(cfg: DictConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from the run config's data section, falling back to FMNIST (1 ch) / ImageNet (3 ch)."""
    mean, std = _cfg_get(cfg, "data.mean"), _cfg_get(cfg, "data.std")
    if mean is None or std is None:
        mean, std = default_stats(channels)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise EvalError(
            f"data.mean/std have {len(mean)}/{len(std)} values but the model takes {channels} channels; "
            "set data.mean=[...] data.std=[...] on the command line"
        )
    return mean, std


def eval_sizes(cfg: DictConfig, dataset_spec: str, patch_size: int | None) -> tuple[int, int]:
    """(resize, crop) of the eval transform; the crop is rounded up to a multiple of the patch size."""
    res = _cfg_get(cfg, "eval.resolution") or _cfg_get(cfg, "crops.global_size")
    if res is None:
        res = 28 if dataset_spec.startswith("fmnist") else 224
    res = int(res)
    if patch_size:
        rounded = math.ceil(res / patch_size) * patch_size
        if rounded != res:
            log.info("eval resolution %d is not a multiple of patch %d: using %d", res, patch_size, rounded)
        res = rounded
    resize = _cfg_get(cfg, "eval.resize")
    if resize is None:
        resize = res if res <= 64 else round(res * 256 / 224)
    return int(resize), res


# ----------------------------------------------------------------------------------------------- model


def load_backbone(
    pretrained: str, cfg: DictConfig, which: str, has_model_cfg: bool = True
) -> tuple[torch.nn.Module | None, DictConfig]:
    """The frozen backbone for `pretrained` (None for the pixel baseline) and the config it was built with."""
    if pretrained == PIXELS:
        return None, cfg
    from dinolike.interop import load_pretrained
    from dinolike.models import build_backbone

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if has_model_cfg and "model" in cfg else None
    if pretrained == RANDOM:
        if model_cfg is None:
            raise EvalError("--pretrained random needs --config (a run config or an arch preset)")
        torch.manual_seed(int(cfg.eval.seed))
        try:
            model = build_backbone(model_cfg, drop_path=False)
        except (ValueError, TypeError) as e:
            raise EvalError(f"cannot build model from {model_cfg}: {e}") from e
        return model.eval(), cfg
    if not os.path.exists(pretrained):  # a file, a run folder or an HF / timm export folder
        raise EvalError(f"checkpoint not found: {pretrained}")
    try:
        model, got_cfg = load_pretrained(pretrained, model_cfg=model_cfg, which=which)
    except (KeyError, RuntimeError, ValueError, OSError) as e:  # strict loading lists offending keys
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise EvalError(f"cannot load {pretrained}: {msg}") from e
    cfg.model = OmegaConf.create({k: v for k, v in dict(got_cfg).items()})
    return model, cfg


def model_channels(model: torch.nn.Module, cfg: DictConfig) -> int:
    """Input channels the backbone expects (from its patch embedding; the config as a fallback)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, torch.nn.Conv2d):
        return int(proj.in_channels)
    return int(_cfg_get(cfg, "model.in_chans", 3))


def source_fingerprint(pretrained: str, cfg: DictConfig, which: str) -> dict[str, Any]:
    """What identifies the feature extractor in the cache key."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else None
    if pretrained == PIXELS:
        return {"source": PIXELS}
    if pretrained == RANDOM:
        return {"source": RANDOM, "seed": int(cfg.eval.seed), "model": model_cfg}
    return {"source": "ckpt", "which": which, "file": path_fingerprint(pretrained), "model": model_cfg}


def default_cache_dir() -> str:
    return os.environ.get("DINOLIKE_FEATURE_CACHE", os.path.expanduser("~/.cache/dinolike/features"))


# --------------------------------------------------------------------------------------------- results


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys -> a GitHub markdown table (floats with 2 decimals)."""
    if not rows:
        return ""
    cols = list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, payload: Mapping[str, Any], title: str, rows: Sequence[Mapping]) -> str:
    """Write results.json and results.md into out_dir; returns the markdown text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = f"### {title}\n\n{markdown_table(rows)}\n"
    for name, text in (("results.md", md), ("results.json", json.dumps(payload, indent=2, default=str) + "\n")):
        tmp = out / f".{name}.{os.getpid()}.tmp"  # per process: two ranks never share a temp file
        tmp.write_text(text)
        os.replace(tmp, out / name)  # results.json last: its presence means both are complete
    return md


class EvalSetup:
    """Everything a protocol needs once the command line is parsed: config, model, features, output."""

    def __init__(self, args: argparse.Namespace, cfg: DictConfig, model: torch.nn.Module | None):
        self.args, self.cfg, self.model = args, cfg, model
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        if args.device:
            self.device = args.device
        else:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            fallback = 1 if args.train_dataset.startswith("fmnist") else 3
            self.channels = int(_cfg_get(cfg, "data.channels", fallback))
            self.patch_size = None
        else:
            self.channels = model_channels(model, cfg)
            self.patch_size = int(model.patch_size)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalSetup:
        cfg, has_model = check_args(args)
        model, cfg = load_backbone(args.pretrained, cfg, args.which, has_model)
        return cls(args, cfg, model)

    @staticmethod
    def timer() -> Callable[[], float]:
        t = time.perf_counter()
        return lambda: time.perf_counter() - t

    def features(self, spec: str, limit: int | None) -> FeatureSet:
        """Features of dataset `spec` (first `limit` items), from the cache when an identical pass exists."""
        from dinolike.data.datasets import DataError, build_dataset

        resize, crop = eval_sizes(self.cfg, spec, self.patch_size)
        mean, std = data_stats(self.cfg, self.channels)
        n_last = int(self.cfg.eval.n_last_blocks)
        key = {
            "extractor": source_fingerprint(self.args.pretrained, self.cfg, self.args.which),
            "dataset": dataset_fingerprint(spec),
            "limit": limit,
            "channels": self.channels,
            "resize": resize,
            "crop": crop,
            "mean": mean,
            "std": std,
            "n_last_blocks": n_last if self.model is not None else 1,
        }

        def compute() -> FeatureSet:
            try:
                ds = build_dataset(spec, channels=self.channels, limit=limit)
            except (DataError, FileNotFoundError, ValueError, KeyError) as e:
                raise EvalError(f"cannot build dataset {spec!r}: {e}") from e
            return extract_features(
                self.model,
                ds,
                build_eval_transform(resize, crop, mean, std),
                channels=self.channels,
                mean=mean,
                std=std,
                resolution=crop,
                resize=resize,
                n_last_blocks=n_last,
                batch_size=int(self.cfg.eval.batch_size),
                num_workers=int(self.cfg.eval.num_workers),
                device=self.device,
                progress=not self.args.no_progress,
                desc=f"features {spec}",
            )

        cache_dir = None if self.args.no_cache else (self.args.cache_dir or default_cache_dir())
        t = self.timer()
        feats, hit = cached_features(cache_dir, key, compute)
        self.timings[f"features[{spec}]"] = t()
        self.cache_hits[spec] = hit
        n_unlabelled = int((feats.labels < 0).sum())
        if n_unlabelled:
            raise EvalError(
                f"{spec}: {n_unlabelled} of {len(feats)} items have no label (images outside class "
                "sub-folders, or an unlabelled spec); supervised evals need labels"
            )
        self.resolution = crop
        return feats

    @property
    def few_label(self) -> bool:
        return self.args.train_fraction is not None or self.args.shots is not None

    def over_label_splits(
        self,
        train: FeatureSet,
        fit: Callable[[FeatureSet], dict[str, Any]],
        headline: Callable[[dict[str, Any]], dict[str, float]],
    ) -> tuple[dict[str, Any], list[dict[str, Any]] | None, dict[str, Any] | None]:
        """`fit` on the whole labelled train set -> (its metrics, None, None); with --train-fraction or
        --shots, `fit` on each seeded class-stratified split -> (mean and `_sd` of the `headline` numbers,
        one table row per seed + a mean +- sd row, the splits' description for results.json)."""
        if not self.few_label:
            return fit(train), None, None
        from .fewlabel import FewLabelError, few_label_indices, mean_and_spread, split_label

        a = self.args
        per_seed: list[dict[str, Any]] = []
        for seed in range(a.label_seeds):
            try:
                idx = few_label_indices(train.labels, seed, a.train_fraction, a.shots)  # [M]
            except FewLabelError as e:
                raise EvalError(f"{a.train_dataset}: {e}") from None
            per_seed.append({"seed": seed, "n_labelled": len(idx), **headline(fit(train.subset(idx)))})
        keys = [k for k in per_seed[0] if k not in ("seed", "n_labelled")]
        summary: dict[str, Any] = {}
        for k in keys:
            summary[k], summary[f"{k}_sd"] = mean_and_spread([r[k] for r in per_seed])
        mean_row = {"seed": "mean ± sd", "n_labelled": per_seed[0]["n_labelled"],
                    **{k: f"{summary[k]:.2f} ± {summary[f'{k}_sd']:.2f}" for k in keys}}
        info = {"split": split_label(a.train_fraction, a.shots), "train_fraction": a.train_fraction,
                "shots": a.shots, "seeds": list(range(a.label_seeds)), "per_seed": per_seed}
        return summary, [*per_seed, mean_row], info

    @staticmethod
    def num_classes(*sets: FeatureSet) -> int:
        return int(max(int(s.labels.max().item()) for s in sets)) + 1

    def finish(
        self,
        protocol: str,
        metrics: Mapping[str, Any],
        rows: Sequence[Mapping[str, Any]],
        *,
        extra: Mapping[str, Any] | None = None,
        train: FeatureSet,
        test: FeatureSet,
    ) -> dict[str, Any]:
        """Write results.json + results.md (rank 0 only), print the table, return the payload."""
        few = (extra or {}).get("few_label")
        default_dir = protocol if few is None else f"{protocol}_{few['split'].replace('%', 'pct')}"
        out_dir = self.args.output_dir or os.path.join("outputs", "eval", default_dir)
        payload: dict[str, Any] = {
            "protocol": protocol,
            "pretrained": self.args.pretrained,
            "which": self.args.which,
            "train_dataset": self.args.train_dataset,
            "val_dataset": self.args.val_dataset,
            "n_train": len(train),  # the labelled set; a few-label run trained on n_labelled of them
            **({"n_labelled": (extra or {})["few_label"]["per_seed"][0]["n_labelled"]}
               if (extra or {}).get("few_label") else {}),
            "n_test": len(test),
            "skipped": {"train": train.skipped, "test": test.skipped},
            "resolution": getattr(self, "resolution", None),
            "feature_dim": int(train.cls.shape[-1]),
            "metrics": dict(metrics),
            **dict(extra or {}),
            "feature_cache_hits": self.cache_hits,
            "timings_s": {**self.timings, "total": time.perf_counter() - self.t0},
            "config": OmegaConf.to_container(self.cfg.eval, resolve=True),
            "model": OmegaConf.to_container(self.cfg.model, resolve=True) if "model" in self.cfg else None,
        }
        rank, _ = dist_info()
        if rank == 0:
            title = f"{protocol} — {self.args.pretrained} on {self.args.val_dataset}"
            if few is not None:
                title += f", {few['split']} of the train labels, {len(few['seeds'])} seeded splits"
            md = write_results(out_dir, payload, title, rows)
            print(md)
            print(f"dinolike eval {protocol}: results written to {Path(out_dir) / 'results.json'} (and results.md)",
                  file=sys.stderr)
        return payload
