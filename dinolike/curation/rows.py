"""Out-of-core access to the embeddings of one set: every shard memory-mapped, read in row slices.

No step holds the [N, D] matrix: a step asks for rows [a, b) (a contiguous slice, one copy of that slice)
or for a sorted list of row ids (a gather), and the operating system pages the shard files in and out.
At D = 384 a 10M pool is 15 GB on disk and a few hundred MB of resident memory per process (pages read are
unmapped again after each slice: they stay in the page cache, not in the process).

Opening checks each shard cheaply (marker present, file sizes and row counts agree with the marker) so that
a missing, truncated or foreign shard is a one-line `StepOutputError` naming it, never a numpy traceback
from the middle of a search. The full SHA-256 check runs once per shard and is remembered in a stamp file
(`shard_XXXXX.verified.json`, keyed by the file's size and mtime): later steps and submissions do not
re-hash hundreds of GB.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

from .store import ShardSet, StepOutputError, read_lines

__all__ = ["EmbeddingView", "open_view", "ArrayRows", "SubsetRows"]

log = logging.getLogger(__name__)


class ArrayRows:
    """An in-memory array with the same row interface as `EmbeddingView` (tests, level > 1 of k-means)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)  # [N, D]

    def __len__(self) -> int:
        return len(self.x)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.x[start:stop]

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(ids, dtype=np.int64)]

    def slices(self, chunk: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        stop = len(self) if stop is None else stop
        for s in range(start, stop, chunk):
            yield s, self.rows(s, min(stop, s + chunk))


class EmbeddingView(ArrayRows):
    """Rows of a set's shards as one virtual [N, D] float32 matrix (row i = i-th embedded image)."""

    def __init__(self, shards: ShardSet, arrays: list[np.ndarray]) -> None:
        self.shards = shards
        self.arrays = [a for a in arrays if a.shape[0]]  # memmaps [n_s, D]; a fully unreadable shard has 0
        self.shard_of = [i for i, a in enumerate(arrays) if a.shape[0]]  # shard index of each array
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])  # [S + 1] first row of each array
        dims = {a.shape[1] for a in self.arrays}
        if len(dims) > 1:
            raise StepOutputError(f"shards of {shards.root} have different widths {sorted(dims)}: mixed embedders")
        self._dim = dims.pop() if dims else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return self._dim

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as one float32 array [stop - start, D] (a copy: the memmap stays unpinned)."""
        stop = min(stop, len(self))
        out = np.empty((max(0, stop - start), self.dim), np.float32)
        a = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = int(self.offsets[a]), int(self.offsets[a + 1])
            end = min(stop, hi)
            out[pos - start : end - start] = self.arrays[a][pos - lo : end - lo]
            self._release(a)
            pos, a = end, a + 1
        return out

    def _release(self, a: int) -> None:
        """Unmap the pages just read from array a (they stay in the page cache): file pages mapped into the
        process count in its RSS, and a full pass over a 15 GB pool would otherwise show up as 15 GB."""
        mm = getattr(self.arrays[a], "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` [m] (any order) as [m, D]; reads each shard's rows in ascending order."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        if not len(ids):
            return out
        if ids.min() < 0 or ids.max() >= len(self):
            raise IndexError(f"row ids must lie in [0, {len(self)})")
        order = np.argsort(ids, kind="stable")
        sid = ids[order]
        which = np.searchsorted(self.offsets, sid, side="right") - 1  # [m] array of each row
        bounds = np.flatnonzero(np.r_[True, which[1:] != which[:-1], True])
        for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True):
            a = int(which[b0])
            out[order[b0:b1]] = self.arrays[a][sid[b0:b1] - self.offsets[a]]
            self._release(a)
        return out

    def names(self, start: int, stop: int) -> list[tuple[str, int]]:
        """(path, label) of rows [start, stop), read from the shards' path lists only where needed."""
        out: list[tuple[str, int]] = []
        for a in range(len(self.arrays)):
            lo, hi = int(self.offsets[a]), int(self.offsets[a + 1])
            if hi <= start or lo >= stop:
                continue
            lines = read_lines(self.shards.paths_file(self.shard_of[a]))[max(start, lo) - lo : min(stop, hi) - lo]
            for line in lines:
                name, _, lab = line.rpartition("\t")
                out.append((name, int(lab)))
        return out


def _check_shard(shards: ShardSet, i: int) -> tuple[dict[str, Any], np.ndarray]:
    """The shard's marker and memmap, or a one-line StepOutputError saying what is wrong with it."""
    where = f"shard {i} of {shards.root}"
    info = shards._marker_info(i)
    if info is None:
        raise StepOutputError(f"{where} is missing ({shards.marker(i).name} absent): run (or finish) `embed`")
    for path in (shards.npy(i), shards.paths_file(i)):
        if not path.is_file():
            raise StepOutputError(f"{where} is missing {path.name}: run `embed` again to recompute it")
    try:
        arr = np.load(shards.npy(i), mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise StepOutputError(f"{where} is damaged ({shards.npy(i).name}: {e}): run `embed` again") from None
    rows = int(info.get("rows", -1))
    if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != rows:
        raise StepOutputError(f"{where} is damaged ({shards.npy(i).name} holds {arr.dtype} {arr.shape}, its marker "
                              f"says {rows} float32 rows): run `embed` again")
    why = shards.check(i, info)
    if why is not None:
        raise StepOutputError(f"{where} is damaged ({why}): run `embed` again to recompute it")
    return info, arr


def open_view(shards: ShardSet) -> EmbeddingView:
    """Every shard of a fully embedded set, memory-mapped and checked (see the module docstring)."""
    n = int(shards.read_items()["n_shards"])
    arrays = [_check_shard(shards, i)[1] for i in range(n)]
    return EmbeddingView(shards, arrays)


class SubsetRows(ArrayRows):
    """Rows `ids` (sorted) of another view, e.g. the deduplicated pool: row j here is row ids[j] there."""

    def __init__(self, base: ArrayRows, ids: np.ndarray) -> None:
        self.base, self.ids = base, np.asarray(ids, dtype=np.int64)  # [M]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.base.dim

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.base.take(self.ids[start:stop])

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self.base.take(self.ids[np.asarray(ids, dtype=np.int64)])
