"""Curation config: `configs/curation/base.yaml` (the schema) <- pipeline file <- command-line dot-list.

Strict like the training config (same merge rules, shared code in `dinolike.config`): a key the schema does
not hold is an error naming it, so a typo such as `dedup.treshold=0.5` cannot silently curate with 0.6.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dinolike.config import CONFIG_DIR, ConfigError, check_values
from dinolike.config import load_config as _load_strict

SCHEMA = CONFIG_DIR / "curation" / "base.yaml"

__all__ = ["SCHEMA", "ConfigError", "check_config", "load_config", "section_fingerprint"]

CHOICES: dict[str, tuple[object, ...]] = {
    "embed.embedder": ("pixels", "backbone"),
    "embed.device": ("auto", "cpu", "cuda"),
    "embed.backbone.which": ("teacher", "student"),
    "index.type": ("auto", "flat", "ivf", "ivfpq"),
    "index.quantizer": ("auto", "flat", "hnsw"),
    "index.gpu": ("auto", True, False, "true", "false"),
    "retrieve.methods": ("sample", "cluster"),
    "build.sources": ("dedup", "retrieve", "sample"),
    "sample.pick": ("random", "closest"),
}
MINIMUM: dict[str, float] = {
    **dict.fromkeys(("embed.shard_size", "embed.batch_size", "index.list_size", "index.nprobe", "dedup.k",
                     "retrieve.k", "retrieve.n_clusters", "retrieve.per_cluster", "sample.target",
                     "scale.part_rows", "scale.chunk_rows", "embed.array_max", "embed.array_parallel",
                     "sample.level1_split"), 1),
    **dict.fromkeys(("embed.num_workers", "index.nlist", "index.threads"), 0),
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema merged with the pipeline file(s) and `key=value` overrides; unknown keys raise ConfigError."""
    return _load_strict(path, overrides, schema_file=SCHEMA)


def section_fingerprint(*parts: Any) -> str:
    """Stable hash of config sections / values: a step's output records the inputs it was computed from,
    so a rerun with the same inputs is skipped and one with changed inputs recomputes."""
    plain = [OmegaConf.to_container(p, resolve=True) if isinstance(p, (DictConfig, ListConfig)) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_config(cfg: DictConfig, step: str) -> None:
    """Values checked before any work, so that `all` cannot embed a pool for an hour and then fail on a
    misspelt retrieval method (also what `dinolike submit curate` runs before submitting)."""
    from dinolike.data.datasets import parse_spec

    check_values(cfg, CHOICES, MINIMUM)
    for key in ("retrieve.methods", "build.sources"):
        if not OmegaConf.select(cfg, key):
            raise ConfigError(f"{key} must not be empty")
    for name in ("pool", "references", "seeds"):
        specs = [cfg[name]] if isinstance(cfg[name], str) else list(cfg[name])
        for spec in specs:
            try:
                scheme, _ = parse_spec(spec)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
            if name == "pool" and scheme == "fmnist":
                raise ConfigError(f"pool spec {spec!r}: the pool must be files (folder:/... or manifest:/...)")
    n_levels = len(cfg.sample.levels)
    for key in ("resample_steps", "sample_size"):
        if len(cfg.sample[key]) != n_levels:
            raise ConfigError(f"sample.{key} has {len(cfg.sample[key])} entries for {n_levels} sample.levels: "
                              "give one per level")
    if step != "demo" and not cfg.pool:
        raise ConfigError("pool is empty: set pool=[folder:/path] (or a manifest)")
    if cfg.embed.embedder == "backbone" and not cfg.embed.backbone.checkpoint:
        raise ConfigError("embed.embedder=backbone needs embed.backbone.checkpoint")
    needs_seeds = step == "retrieve" or (step in ("all", "build") and "retrieve" in cfg.build.sources)
    if needs_seeds and not cfg.seeds:
        raise ConfigError("retrieval needs seed images: set seeds=[...] (or leave retrieve out of build.sources)")
