"""Atomic, checksummed checkpoints (temp file + rename, keep the last K) and everything exact resume needs.

A checkpoint holds the method's state (student, teacher, centres), the optimizer, the iteration, the RNG
states and the merged config. Data order and augmentations are functions of (seed, sample position), so
the iteration alone tells where the data stream resumes.

Integrity, because a checkpoint is the only copy of days of compute:
- `checksum` is a SHA-256 over every tensor and value of the state; torch.load does not notice a flipped
  byte inside a tensor (it loads the wrong number), so the digest is recomputed on every load.
- a checkpoint with NaN/inf weights is never written: the previous, good one stays the newest.
- a new checkpoint is read back and verified before any older one is deleted (keep_last).
- resume walks back from the newest checkpoint to the newest intact one; damaged files are renamed to
  `*.damaged` (kept for inspection, out of the way of resume and of keep_last).
FSDP runs write sharded DCP folders instead (`ckpt_NNNNNNN/`, dcp.py) with the same guarantees; both kinds
share the naming, the listing, keep_last and the walk back, so a run can move between them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dinolike.checkpoints import dcp
from dinolike.checkpoints.atomic import CheckpointWriteError, NonFiniteStateError, RunWriteError, atomic_save
from dinolike.models.load import CheckpointMismatchError, state_checksum, state_leaves

__all__ = ["CheckpointWriteError", "DamagedCheckpointError", "NonFiniteStateError", "RunWriteError", "atomic_save"]

log = logging.getLogger("dinolike.train")

_NAME = re.compile(r"ckpt_(\d{7,})(\.pt)?$")  # a file, or a DCP folder
_TEMP = re.compile(r"\.ckpt_\d{7,}(\.pt\.tmp\d+|\.tmp)$")
DAMAGED_SUFFIX = ".damaged"


class DamagedCheckpointError(CheckpointMismatchError):
    """A checkpoint file that cannot be read, is not a training checkpoint, or fails its checksum."""


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


def checkpoint_path(ckpt_dir: Path, iteration: int, sharded: bool = False) -> Path:
    return ckpt_dir / (f"ckpt_{iteration:07d}" if sharded else f"ckpt_{iteration:07d}.pt")


def remove_checkpoint(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def prune(ckpt_dir: Path, iteration: int, keep_last: int) -> None:
    """Delete checkpoints up to `iteration` beyond the newest `keep_last`; a newer one (left by an earlier
    run) never pushes out the checkpoint just written."""
    if keep_last > 0:
        upto = [p for p in list_checkpoints(ckpt_dir) if _iteration_of(p) <= iteration]
        for old in upto[:-keep_last]:
            remove_checkpoint(old)


def _iteration_of(path: Path) -> int:
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"not a checkpoint name: {path.name}")
    return int(m.group(1))


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first (temp files and quarantined `.damaged` ones never match the name)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """A checkpoint file or DCP folder, or a run directory (or its checkpoints/ folder): its newest checkpoint."""
    p = Path(path)
    if dcp.is_dcp_checkpoint(p):
        return p
    if p.is_dir():
        found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if not found:
            raise FileNotFoundError(f"{what}: no checkpoint (ckpt_*.pt) in {p} or {p / 'checkpoints'}")
        return found[-1]
    if not p.is_file():
        raise FileNotFoundError(f"{what}: checkpoint not found: {p}")
    return p


# ------------------------------------------------------------------------------------------ checksum


def non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of floating-point tensors in `tree` holding NaN or inf."""
    return [name for name, leaf in state_leaves(tree, prefix)
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all()]


# ------------------------------------------------------------------------------------ save and load


def save_checkpoint(ckpt_dir: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write, verify by reading back, and only then delete checkpoints beyond the newest `keep_last`.

    Raises NonFiniteStateError (nothing written) or CheckpointWriteError (older checkpoints untouched)."""
    path = checkpoint_path(ckpt_dir, iteration)
    previous = [p for p in list_checkpoints(ckpt_dir) if _iteration_of(p) < iteration]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
    bad = non_finite_tensors(state.get("model", {}), "model")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteStateError(f"refused to checkpoint iteration {iteration}: {bad[0]} holds NaN/inf{more}; "
                                  f"{kept}")
    try:
        atomic_save({**state, "checksum": state_checksum(state)}, path)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}; {kept}") from None
    try:
        try:
            load_checkpoint(path, mmap=True)  # what a resume would read, from the file just written
        except DamagedCheckpointError:
            load_checkpoint(path)  # a filesystem that cannot mmap: read it plainly before calling it damaged
    except DamagedCheckpointError as e:
        _quarantine(path)
        raise CheckpointWriteError(f"checkpoint {path} did not read back intact ({e}); {kept}") from None
    prune(ckpt_dir, iteration, keep_last)
    return path


def load_checkpoint(path: Path, mmap: bool = False, model: bool = True) -> dict[str, Any]:
    """Load (weights only) and verify a training checkpoint; DamagedCheckpointError names the file and why.
    Checkpoints written before checksums existed are accepted on their structure alone.

    A DCP folder is verified (collectively when distributed: every rank must call) and gives its meta
    (`format: dcp`); with `model` also the full model tensors, read in this process (export, distillation)."""
    if Path(path).is_dir():
        return _load_dcp(Path(path), model)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - named file, readable reason
        # the first sentence: torch appends a paragraph of advice; an empty file raises a bare EOFError
        reason = str(e).split(". ")[0].splitlines()[0] if str(e).strip() else "the file is empty or cut short"
        raise DamagedCheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {reason}") from None
    if not isinstance(ckpt, dict):
        raise DamagedCheckpointError(f"{path} is not a dinolike training checkpoint (holds a {type(ckpt).__name__})")
    for key in ("model", "optimizer", "iteration", "config"):
        if key not in ckpt:
            raise DamagedCheckpointError(f"{path} is not a dinolike training checkpoint (no '{key}')")
    if "checksum" in ckpt and ckpt["checksum"] != state_checksum(ckpt):
        raise DamagedCheckpointError(f"{path} fails its checksum: the file was damaged after it was written")
    return ckpt


def _load_dcp(path: Path, model: bool) -> dict[str, Any]:
    why = dcp.verify(path)
    if why is not None:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {why}")
    try:
        ckpt = dcp.read_meta(path)
        if model:
            ckpt["model"] = dcp.read_full_model(path)
    except Exception as e:  # noqa: BLE001 - named folder, readable reason
        raise DamagedCheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    return ckpt


def _quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never loaded or counted again)."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another rank moved it first
        pass
    return target


def newest_intact(ckpt_dir: Path, main: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads and verifies, and its content; None when there is none at all.

    Every rank walks back the same way (the files decide); rank 0 (`main`) warns, naming each damaged
    file, renames it to `*.damaged` and removes temp files of writes that a crash interrupted. When
    checkpoints exist but none is intact: DamagedCheckpointError, since silently training from scratch
    would discard the run."""
    if main and ckpt_dir.is_dir():
        for tmp in ckpt_dir.iterdir():
            if _TEMP.match(tmp.name):
                log.warning("removing %s: a checkpoint write that a crash interrupted", tmp)
                remove_checkpoint(tmp)
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ckpt = load_checkpoint(path, model=False)  # a DCP folder: its shards are loaded by each rank
        except DamagedCheckpointError as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged if main else []:
            where = _quarantine(bad).name
            log.warning("%s; resuming from %s instead (the damaged file is kept as %s)", why, path.name, where)
        return path, ckpt
    if damaged:  # left in place: every rerun stops here until someone looks
        raise DamagedCheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(why for _, why in damaged)
                                     + "; move the folder away to start from scratch")
    return None


def config_json(cfg_container: dict) -> str:
    return json.dumps(cfg_container, sort_keys=True)
