"""What every eval protocol does around its math: load the backbone, extract (or load cached) features of
the labelled sets, repeat over few-label splits, write the results.

Every protocol is `EvalSetup.of(cfg) -> features -> protocol -> EvalSetup.finish`, so the three of them
read the same config keys and write results the same way.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dinolike.data.normalize import build_eval_transform
from dinolike.eval.config import PIXELS, RANDOM, EvalError, cfg_get, data_stats, eval_sizes
from dinolike.eval.feature_cache import cached_features, dataset_fingerprint, path_fingerprint
from dinolike.eval.features import FeatureSet, dist_info, extract_features
from dinolike.eval.results import write_results


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
    return int(cfg_get(cfg, "model.in_chans", 3))


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


class EvalSetup:
    """Everything a protocol needs from its config: the model, the features, the output."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module | None):
        self.cfg, self.model = cfg, model
        self.job = cfg.eval  # the job keys: what to evaluate, on what, where the results go
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        self.device = str(cfg.eval.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            fallback = 1 if str(self.job.train_dataset).startswith("fmnist") else 3
            self.channels = int(cfg_get(cfg, "data.channels", fallback))
            self.patch_size = None
        else:
            self.channels = model_channels(model, cfg)
            self.patch_size = int(model.patch_size)

    @classmethod
    def of(cls, cfg: DictConfig) -> EvalSetup:
        """The backbone `cfg.eval.pretrained` loaded (a config from `dinolike.eval.config.job_config`)."""
        model, cfg = load_backbone(str(cfg.eval.pretrained), cfg, str(cfg.eval.which), "model" in cfg)
        return cls(cfg, model)

    @staticmethod
    def timer() -> Callable[[], float]:
        t = time.perf_counter()
        return lambda: time.perf_counter() - t

    def labelled_sets(self) -> tuple[FeatureSet, FeatureSet]:
        """Features of the job's train and evaluation sets."""
        e = self.cfg.eval
        return (self.features(str(e.train_dataset), e.limit_train), self.features(str(e.val_dataset), e.limit_val))

    def features(self, spec: str, limit: int | None) -> FeatureSet:
        """Features of dataset `spec` (first `limit` items), from the cache when an identical pass exists."""
        from dinolike.data.datasets import DataError, build_dataset

        resize, crop = eval_sizes(self.cfg, spec, self.patch_size)
        mean, std = data_stats(self.cfg, self.channels)
        n_last = int(self.cfg.eval.n_last_blocks)
        key = {
            "extractor": source_fingerprint(str(self.job.pretrained), self.cfg, str(self.job.which)),
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
                progress=bool(self.cfg.eval.progress),
                desc=f"features {spec}",
            )

        cache_dir = (self.cfg.eval.cache_dir or default_cache_dir()) if self.cfg.eval.cache else None
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
        return self.job.train_fraction is not None or self.job.shots is not None

    def over_label_splits(
        self,
        train: FeatureSet,
        fit: Callable[[FeatureSet], dict[str, Any]],
        headline: Callable[[dict[str, Any]], dict[str, float]],
    ) -> tuple[dict[str, Any], list[dict[str, Any]] | None, dict[str, Any] | None]:
        """`fit` on the whole labelled train set -> (its metrics, None, None); with a train fraction or
        shots, `fit` on each seeded class-stratified split -> (mean and `_sd` of the `headline` numbers,
        one table row per seed + a mean +- sd row, the splits' description for results.json)."""
        if not self.few_label:
            return fit(train), None, None
        from dinolike.eval.fewlabel import FewLabelError, few_label_indices, mean_and_spread, split_label

        j = self.job
        per_seed: list[dict[str, Any]] = []
        for seed in range(int(j.label_seeds)):
            try:
                idx = few_label_indices(train.labels, seed, j.train_fraction, j.shots)  # [M]
            except FewLabelError as e:
                raise EvalError(f"{j.train_dataset}: {e}") from None
            per_seed.append({"seed": seed, "n_labelled": len(idx), **headline(fit(train.subset(idx)))})
        keys = [k for k in per_seed[0] if k not in ("seed", "n_labelled")]
        summary: dict[str, Any] = {}
        for k in keys:
            summary[k], summary[f"{k}_sd"] = mean_and_spread([r[k] for r in per_seed])
        mean_row = {"seed": "mean ± sd", "n_labelled": per_seed[0]["n_labelled"],
                    **{k: f"{summary[k]:.2f} ± {summary[f'{k}_sd']:.2f}" for k in keys}}
        info = {"split": split_label(j.train_fraction, j.shots), "train_fraction": j.train_fraction,
                "shots": j.shots, "seeds": list(range(int(j.label_seeds))), "per_seed": per_seed}
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
        j = self.job
        few = (extra or {}).get("few_label")
        default_dir = protocol if few is None else f"{protocol}_{few['split'].replace('%', 'pct')}"
        out_dir = str(self.cfg.eval.output_dir or os.path.join("outputs", "eval", default_dir))
        payload: dict[str, Any] = {
            "protocol": protocol,
            "pretrained": str(j.pretrained),
            "which": str(j.which),
            "train_dataset": str(j.train_dataset),
            "val_dataset": str(j.val_dataset),
            "n_train": len(train),  # the labelled set; a few-label run trained on n_labelled of them
            **({"n_labelled": few["per_seed"][0]["n_labelled"]} if few else {}),
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
            title = f"{protocol} — {j.pretrained} on {j.val_dataset}"
            if few is not None:
                title += f", {few['split']} of the train labels, {len(few['seeds'])} seeded splits"
            md = write_results(out_dir, payload, title, rows)
            print(md)
            print(f"dinolike eval {protocol}: results written to {Path(out_dir) / 'results.json'} (and results.md)",
                  file=sys.stderr)
        return payload
