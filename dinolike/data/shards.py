"""Read WebDataset tar shards by dataset index: the `shards:DIR` data scheme.

On disk (written by `dinolike shard`, see shard_writer.py):
  DIR/index.json             the shard list in wids' format (`wids-shard-index-v1`: url, nsamples,
                             filesize, md5sum per shard) plus a `dinolike` section (items, classes)
  DIR/shard-000000.tar       plain tar, WebDataset naming: `000000042.jpg` (+ `000000042.cls`)
  DIR/shard-000000.idx.npy   int64 [nsamples, 3]: byte offset and size of each image member, label

The tar files are what `tar`, `webdataset.WebDataset` and `wids.ShardListDataset` read; the `.idx.npy`
beside each lets a worker read one member with one `pread` instead of scanning the tar's headers (a
scan touches every page of a shard on network storage). Nothing here is O(items): a reader holds the
index (O(shards)) and the sidecars of the few shards it has open.

Faults: a shard missing or shorter than the index says is a one-line DataError at start-up (every rank
checks, so no rank waits on another in a collective); a member that does not decode, or a shard that
goes bad during the run, is a counted skip with a warning naming the shard, like an unreadable file.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import _IMAGE_READ_ERRORS, DataError, read_image
from .shard_order import BlockOrder

__all__ = ["INDEX_NAME", "ShardDataset", "index_path", "load_index", "sidecar_name"]

INDEX_NAME = "index.json"
INDEX_KIND = "wids-shard-index-v1"
FORMAT_VERSION = 1


def sidecar_name(shard: str) -> str:
    """`shard-000000.tar` -> `shard-000000.idx.npy` (member offsets, sizes, labels)."""
    return shard[: -len(".tar")] + ".idx.npy" if shard.endswith(".tar") else shard + ".idx.npy"


def index_path(root: str | os.PathLike) -> Path:
    """The index of a shard folder, or the index file itself."""
    p = Path(root)
    return p / INDEX_NAME if p.is_dir() or not p.suffix else p


def load_index(root: str | os.PathLike) -> dict[str, Any]:
    """index.json, checked for shape; DataError names the file and what is wrong."""
    path = index_path(root)
    if not path.is_file():
        raise DataError(f"shard index not found: {path} (write shards with `dinolike shard SOURCE --out DIR`)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable shard index ({e})") from None
    shards = index.get("shardlist") if isinstance(index, dict) else None
    if index.get("__kind__") != INDEX_KIND or not isinstance(shards, list) or not shards:
        raise DataError(f"{path}: not a shard index ({INDEX_KIND} with a non-empty shardlist)")
    for k, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("url"), str) or not isinstance(s.get("nsamples"), int):
            raise DataError(f"{path}: shardlist entry {k} lacks url / nsamples")
    return index


class ShardDataset:
    """Items of a shard folder as `(image | None, label)`, indexed shard-major: 0 .. N-1.

    `window` is the number of shards mixed per block of an epoch (`order`); a worker keeps the shards
    of about two blocks open (`2 * window` file handles and sidecars)."""

    always_readable = False

    def __init__(self, root: str | os.PathLike, channels: int = 3, limit: int | None = None,
                 window: int = 16, check_files: bool = True) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        path = index_path(root)
        index = load_index(path)
        self.root, self.channels, self.window = path.parent, channels, max(1, int(window))
        self.shards = [s["url"] for s in index["shardlist"]]  # [S] names relative to root
        counts = np.array([s["nsamples"] for s in index["shardlist"]], dtype=np.int64)  # [S]
        if check_files:
            self._check_files(index["shardlist"])
        if limit is not None:  # the first `limit` items, shard-major
            cum = np.cumsum(counts)
            keep = int(np.searchsorted(cum, limit, side="left")) + 1
            counts = counts[:keep].copy()
            counts[-1] -= max(0, int(counts.sum()) - limit)
            self.shards = self.shards[:keep]
        self.counts = counts
        self.cum = np.cumsum(counts)  # [S] one past the last index of each shard
        meta = index.get("dinolike", {})
        self.num_classes = int(meta.get("num_classes", 0))
        self.classes: list[str] = list(meta.get("classes", []))
        self._open: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()  # shard -> (fd, sidecar)
        self._bad: set[int] = set()  # shards found unusable in this process (warned once)

    def _check_files(self, shardlist: list[dict]) -> None:
        """A stat per shard: missing or cut-short shards fail now, naming the first, not mid-run."""
        for s in shardlist:
            p = self.root / s["url"]
            try:
                size = p.stat().st_size
            except OSError:
                raise DataError(f"shard {p} is missing (listed in {self.root / INDEX_NAME})") from None
            want = s.get("filesize")
            if want is not None and size != want:
                raise DataError(f"shard {p} is truncated or damaged: {size} bytes, the index says {want}")

    def __len__(self) -> int:
        return int(self.cum[-1])

    def order(self, epoch: int, seed: int, shuffle: bool = True) -> BlockOrder:
        """The dataset order of `epoch`: offset -> index, computed per call (see shard_order.py)."""
        return BlockOrder(self.counts, seed, epoch, self.window, shuffle)

    def locate(self, i: int) -> tuple[int, int]:
        """Dataset index -> (shard, member)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} is outside [0, {len(self)})")
        s = int(np.searchsorted(self.cum, i, side="right"))
        return s, int(i - (self.cum[s] - self.counts[s]))

    def name_of(self, i: int) -> str:
        s, m = self.locate(i)
        return f"{self.root / self.shards[s]} member {m}"

    def _shard(self, s: int) -> tuple[int, np.ndarray]:
        """(file descriptor, sidecar [n, 3]) of shard `s`, from a small LRU of open shards."""
        hit = self._open.get(s)
        if hit is not None:
            self._open.move_to_end(s)
            return hit
        tar = self.root / self.shards[s]
        side = np.load(self.root / sidecar_name(self.shards[s]), allow_pickle=False)  # [n, 3] int64
        if side.ndim != 2 or side.shape[1] != 3 or len(side) < self.counts[s]:
            raise ValueError(f"sidecar shape {side.shape} does not match {self.counts[s]} items")
        fd = os.open(tar, os.O_RDONLY)
        self._open[s] = (fd, side)
        while len(self._open) > 2 * self.window:
            old_fd, _ = self._open.popitem(last=False)[1]
            os.close(old_fd)
        return fd, side

    def read_bytes(self, s: int, m: int) -> tuple[bytes, int]:
        """(encoded image bytes, label) of member m of shard s: one pread at the sidecar's offset."""
        fd, side = self._shard(s)
        offset, size, label = (int(v) for v in side[m])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes): the shard was cut short")
        return data, label

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        s, m = self.locate(i)
        try:
            data, label = self.read_bytes(s, m)
        except (OSError, ValueError) as e:  # the shard vanished or was damaged during the run
            if s not in self._bad:
                self._bad.add(s)
                warnings.warn(f"skipping unreadable shard {self.root / self.shards[s]}: {e}", stacklevel=2)
            return None, -1
        try:
            return read_image(io.BytesIO(data), self.channels), label
        except _IMAGE_READ_ERRORS as e:
            warnings.warn(f"skipping unreadable image {self.name_of(i)}: {type(e).__name__}: {e}", stacklevel=2)
            return None, label

    def __getstate__(self) -> dict[str, Any]:
        """Loader workers open their own files (a descriptor is not shared across processes)."""
        return {**self.__dict__, "_open": OrderedDict(), "_bad": set()}

    def __del__(self) -> None:
        for fd, _ in getattr(self, "_open", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"ShardDataset(root={str(self.root)!r}, n={len(self)}, shards={len(self.shards)})"
