"""Atomic writes (temp file, fsync, rename) and the errors of writing a run's files: shared by the
single-file checkpoints (files.py), the sharded ones (dcp.py) and the exports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dinolike.errors import DinolikeError


class RunWriteError(DinolikeError, RuntimeError):
    """A file of the run (checkpoint, metrics, export) could not be written: disk full, quota, I/O error."""


class CheckpointWriteError(RunWriteError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous checkpoint is untouched."""


class NonFiniteStateError(DinolikeError, RuntimeError):
    """The state to checkpoint holds NaN/inf weights; it is refused so the last good checkpoint stays newest."""


class _WriteRecorder:
    """A file wrapper that keeps the OSError of a failed write: torch.save turns a full disk into a
    RuntimeError ("unexpected pos 704 vs 598") that names neither the errno nor the file."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()

    def __getattr__(self, name: str) -> Any:  # name, fileno, ...: the real file's
        return getattr(self.file, name)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact.
    A failed write (e.g. ENOSPC) removes its temp file, so a full disk is not made fuller, and raises the
    OSError that caused it (torch.save's own error hides it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
