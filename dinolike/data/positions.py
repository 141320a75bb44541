"""Position-indexed sampling: every sample of a run is addressed by its GLOBAL POSITION.

Position ``g`` counts samples since the start of training (across all ranks). It fixes the epoch
(``g // len(base)``), the dataset index (a per-epoch permutation seeded by (seed, epoch)) and the random
stream of the augmentation and masks (seeded by (seed, epoch, index)). Hence a batch's content depends on
nothing but the positions it holds: not on worker count, worker scheduling, world size, or the training
process's global RNG, and resuming at ``iteration * global_batch_size`` replays exactly what an
uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["derive_seed", "SSLDataset", "PositionSampler", "PositionBatchSampler"]

_M64 = (1 << 64) - 1
_STREAM_PERM, _STREAM_AUG, _STREAM_MASK = 0x5045524D, 0x41554731, 0x4D41534B  # "PERM", "AUG1", "MASK"


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 finaliser: a cheap, well-mixed bijection on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed; nearby tuples (epoch, epoch + 1) get unrelated seeds."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _M64))
    return h >> 1


class _Indexable(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Any, int]: ...


class SSLDataset(Dataset):
    """Wraps a base dataset ``(image | None, label)`` for SSL training, indexed by global position.

    ``transform(img, generator)`` is called with a private generator when it declares
    ``accepts_generator = True`` (fast path); any other ``transform(img)`` runs under
    ``torch.random.fork_rng`` with torch, python and numpy global RNGs seeded and restored afterwards.
    ``mask_fn(generator) -> bool [h, w]`` is called once per global crop.

    ``__getitem__(g)`` returns the transform's crops plus ``masks`` (bool [n_global, h*w] or None),
    ``label``, ``index``, ``epoch``, ``position`` and ``ok`` (False when the image could not be read or
    transformed; such samples carry no crops and are counted and dropped by ``collate_ssl``).
    """

    def __init__(
        self,
        base: _Indexable,
        transform: Callable[..., dict[str, Any]],
        seed: int,
        mask_fn: Callable[[torch.Generator], torch.Tensor] | None = None,
        shuffle: bool = True,
    ) -> None:
        if len(base) == 0:
            raise ValueError("SSLDataset: the base dataset is empty")
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self.mask_fn = mask_fn
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: Sequence[int] = []

    def __len__(self) -> int:
        """Samples per epoch (positions are unbounded: any g >= 0 is valid)."""
        return len(self.base)

    def permutation(self, epoch: int) -> Sequence[int]:
        """The dataset order of ``epoch`` (cached: a loader worker usually stays within one epoch); a base
        with an ``order(epoch, seed, shuffle)`` method (shards) computes it per offset instead of a list."""
        if epoch != self._perm_epoch:
            n = len(self.base)
            if hasattr(self.base, "order"):  # sharded data: offset -> index computed per call, no list
                self._perm = self.base.order(epoch, self.seed, self.shuffle)
            elif self.shuffle:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _STREAM_PERM))
                self._perm = torch.randperm(n, generator=gen).tolist()
            else:
                self._perm = list(range(n))
            self._perm_epoch = epoch
        return self._perm

    def locate(self, position: int) -> tuple[int, int]:
        """Global position -> (epoch, dataset index)."""
        if position < 0:
            raise IndexError(f"global position must be >= 0, got {position}")
        epoch, offset = divmod(int(position), len(self.base))
        return epoch, self.permutation(epoch)[offset]

    def _run_transform(self, img: Any, seed: int) -> dict[str, Any]:
        if getattr(self.transform, "accepts_generator", False):
            return self.transform(img, torch.Generator().manual_seed(seed))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getitem__(self, position: int) -> dict[str, Any]:
        epoch, index = self.locate(position)
        img, label = self.base[index]
        out: dict[str, Any] = {"position": int(position), "epoch": epoch, "index": index, "label": int(label)}
        if img is None:  # the base dataset already warned with the file name
            out["ok"] = False
            return out
        sample_seed = derive_seed(self.seed, epoch, index)
        try:
            crops = self._run_transform(img, derive_seed(sample_seed, _STREAM_AUG))
        except (OSError, ValueError) as e:  # e.g. a lazily decoded file turns out truncated
            # ValueError also covers a transform rejecting an image (wrong channels, zero size).
            msg = f"skipping sample {index} (position {position}): transform failed: {e}"
            warnings.warn(msg, stacklevel=2)
            out["ok"] = False
            return out
        out.update(crops)
        masks = None
        if self.mask_fn is not None:
            gen = torch.Generator().manual_seed(derive_seed(sample_seed, _STREAM_MASK))
            masks = torch.stack([self.mask_fn(gen).flatten() for _ in crops["global_crops"]])  # [n_global, N]
        out["masks"] = masks
        out["ok"] = True
        return out


class PositionSampler:
    """Infinite stream of this rank's global positions: start + rank, start + rank + world_size, ...

    Batched by :class:`PositionBatchSampler`, global batch k of size ``world_size * B`` holds exactly the
    positions ``start + k*world_size*B ... start + (k+1)*world_size*B - 1``, split across ranks, so a run
    resumed at ``start = iteration * global_batch_size`` continues where it stopped, for any world size.
    """

    def __init__(self, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.start, self.rank, self.world_size = int(start), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start + self.rank, self.world_size)


class PositionBatchSampler:
    """Groups a :class:`PositionSampler` into lists of ``batch_size`` consecutive positions of this rank."""

    def __init__(self, sampler: PositionSampler, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        while True:
            yield list(itertools.islice(it, self.batch_size))
