"""Sharded steps: rows split into parts, parts split over ranks, each part's result committed on its own.

A part covers pool rows [p * part_rows, (p + 1) * part_rows). It is the unit of resume (a killed step redoes
only the parts without a marker) and of parallelism: with torch.distributed initialised (torchrun, or the
tasks of one SLURM job through `dinolike submit`), rank r takes parts r, r + W, r + 2W, ...; alone, one
process takes them all. A final small step on rank 0 merges the part files.

A part's marker records the fingerprint of the inputs it was computed from: parts of an older config are
recomputed, never mixed in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinolike import dist

from .store import StepOutputError, save_npz, write_json

__all__ = ["Ranks", "OneRank", "PartSet", "ranks"]

log = logging.getLogger(__name__)


class Ranks:
    """This process's place among the ranks of a sharded step (1 of 1 without torch.distributed)."""

    def __init__(self) -> None:
        env = dist.init_distributed("cpu")  # gloo: the collectives carry host arrays
        self.rank, self.world = env.rank, env.world_size

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (float64 / int64 keep it independent of the reduction order)."""
        return dist.all_reduce_sum(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def gather(self, obj: Any) -> list[Any]:
        return dist.all_gather_objects(obj)

    def together(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank, then stop every rank if any of them failed: a rank that raised must not
        leave the others waiting at the next collective (a hang, not an error)."""
        exc: Exception | None = None
        try:
            out = fn()
        except (StepOutputError, ValueError, OSError, RuntimeError) as e:
            out, exc = None, e
        errors = [(i, e) for i, e in enumerate(self.gather(None if exc is None else f"{type(exc).__name__}: {exc}"))
                  if e is not None]
        if exc is not None:
            raise exc  # this rank's own error, as it was
        if errors:
            rank, msg = errors[0]
            raise StepOutputError(f"rank {rank} of {self.world} failed: {msg}")
        return out

    def agree(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank (a small Python object)."""
        return self.gather(obj)[0]


class OneRank(Ranks):
    """Rank 0 of 1 whatever torch.distributed says: for work that one process does alone inside a sharded
    step (a split of k-means level 1), whose collectives must not wait for the other ranks."""

    def __init__(self) -> None:
        self.rank, self.world = 0, 1

    def barrier(self) -> None:
        pass

    def sum(self, x: np.ndarray) -> np.ndarray:
        return x

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


def ranks() -> Ranks:
    return Ranks()


class PartSet:
    """Part files `part_XXXXX.npz` + markers `part_XXXXX.done.json` of one sharded computation under `root`."""

    def __init__(self, root: str | Path, n_rows: int, part_rows: int, fingerprint: str) -> None:
        self.root = Path(root)
        self.n_rows, self.part_rows, self.fingerprint = int(n_rows), int(part_rows), fingerprint
        self.n_parts = max(1, math.ceil(self.n_rows / self.part_rows))

    def bounds(self, p: int) -> tuple[int, int]:
        return p * self.part_rows, min(self.n_rows, (p + 1) * self.part_rows)

    def file(self, p: int) -> Path:
        return self.root / f"part_{p:05d}.npz"

    def marker(self, p: int) -> Path:
        return self.root / f"part_{p:05d}.done.json"

    def done(self, p: int) -> bool:
        try:
            info = json.loads(self.marker(p).read_text())
        except (OSError, ValueError):
            return False
        return info.get("fingerprint") == self.fingerprint and self.file(p).is_file()

    def mine(self, r: Ranks) -> Iterator[int]:
        """This rank's parts that are not done yet."""
        for p in range(r.rank, self.n_parts, r.world):
            if self.done(p):
                log.info("%s part %d: done, skipped", self.root.name, p)
                continue
            yield p

    def write(self, p: int, **arrays: np.ndarray) -> None:
        """Arrays first, the marker last (the commit point of the part)."""
        save_npz(self.file(p), **arrays)
        write_json(self.marker(p), {"fingerprint": self.fingerprint, "rows": list(self.bounds(p))})

    def load(self, p: int) -> dict[str, np.ndarray]:
        if not self.done(p):
            raise StepOutputError(f"{self.file(p)} is not complete: a rank failed; run the step again to finish it")
        with np.load(self.file(p)) as z:
            return {k: z[k] for k in z.files}

    def all(self, key: str) -> np.ndarray:
        """One array of every part concatenated in part order (the merge step's input)."""
        return np.concatenate([self.load(p)[key] for p in range(self.n_parts)])
