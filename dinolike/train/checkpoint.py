"""Atomic checkpoints (temp file + rename, keep the last K) and everything exact resume needs.

A checkpoint holds the method's state (student, teacher, centres), the optimizer, the iteration, the RNG
states and the merged config. Data order and augmentations are functions of (seed, sample position), so
the iteration alone tells where the data stream resumes.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from dinolike.models.load import CheckpointMismatchError

_NAME = re.compile(r"ckpt_(\d{7,})\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def checkpoint_path(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / f"ckpt_{iteration:07d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files never match the name pattern)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """A checkpoint file, or a run directory (or its checkpoints/ folder): its newest checkpoint."""
    p = Path(path)
    if p.is_dir():
        found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if not found:
            raise FileNotFoundError(f"{what}: no checkpoint (ckpt_*.pt) in {p} or {p / 'checkpoints'}")
        return found[-1]
    if not p.is_file():
        raise FileNotFoundError(f"{what}: checkpoint not found: {p}")
    return p


def save_checkpoint(ckpt_dir: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    path = checkpoint_path(ckpt_dir, iteration)
    atomic_save(state, path)
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - named file, readable reason
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    for key in ("model", "optimizer", "iteration", "config"):
        if key not in ckpt:
            raise CheckpointMismatchError(f"{path} is not a dinolike training checkpoint (no '{key}')")
    return ckpt


def config_json(cfg_container: dict) -> str:
    return json.dumps(cfg_container, sort_keys=True)
