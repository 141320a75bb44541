"""Where each step keeps its output in the work dir, and how a step knows it is up to date.

Each of `dedup`, `retrieve` and `sample` records a fingerprint of everything it was computed from (its config
sections and the fingerprints of its inputs) in `STEP/done.json`: a rerun with the same inputs is skipped, a
rerun after a config change recomputes. Unfinished sharded work lives in `STEP/work/<fingerprint>/`, so a
resumed step picks up parts of the same config only.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .config import section_fingerprint
from .embed_step import set_specs, shard_set
from .store import StepOutputError

__all__ = ["step_dir", "work_dir", "embeddings_fingerprint", "done", "up_to_date", "require", "prune_work"]

log = logging.getLogger(__name__)


def step_dir(cfg: DictConfig, step: str) -> Path:
    return Path(cfg.work_dir) / step


def work_dir(cfg: DictConfig, step: str, fingerprint: str) -> Path:
    """Scratch of one run of a sharded step (parts, index, k-means checkpoints), named by its fingerprint."""
    return step_dir(cfg, step) / "work" / fingerprint


def prune_work(cfg: DictConfig, step: str, keep: str) -> None:
    """Drop the scratch of other configs' runs (a finished run keeps its own: later steps may read it)."""
    root = step_dir(cfg, step) / "work"
    for d in root.glob("*") if root.is_dir() else []:
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def embeddings_fingerprint(cfg: DictConfig, names: tuple[str, ...]) -> str:
    """Identity of the embedded sets: item lists and every shard marker (rows, skipped, embedder)."""
    parts: list[Any] = []
    for name in names:
        if not set_specs(cfg, name):
            continue
        shards = shard_set(cfg, name)
        info = shards.read_items()
        for i in range(int(info["n_shards"])):
            if not shards.marker(i).is_file():
                raise StepOutputError(f"{shards.npy(i)} is not complete: run (or finish) the `embed` step first")
            parts.append(json.loads(shards.marker(i).read_text()))
        parts.append(info)
    return section_fingerprint(parts)


def done(cfg: DictConfig, step: str) -> dict[str, Any] | None:
    path = step_dir(cfg, step) / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def up_to_date(cfg: DictConfig, step: str, fingerprint: str, force: bool) -> bool:
    d = done(cfg, step)
    if d is not None and d["fingerprint"] == fingerprint and not force:
        log.info("%s: up to date (%s), skipped", step, step_dir(cfg, step))
        return True
    return False


def require(cfg: DictConfig, step: str, before: str) -> dict[str, Any]:
    d = done(cfg, step)
    if d is None:
        raise StepOutputError(f"`{before}` needs the output of `{step}` in {cfg.work_dir}: run `{step}` first")
    return d
