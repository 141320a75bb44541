"""The order of one epoch over sharded data, computed per position: no per-item list anywhere.

`SSLDataset` turns a global position into (epoch, offset); for a folder it then looks the offset up in a
`randperm(N)` list (40 B per item in every worker: 4 GB at 100M). Sharded data needs neither the list nor
a random read of any item anywhere: an epoch is

1. the shards in a seeded random order (an O(shards) array),
2. cut into blocks of `window` consecutive shards of that order,
3. within a block, the items of its shards in a keyed pseudo-random order: a Feistel bijection on
   [0, block size), so that offset -> item is a few integer hashes and needs no table.

Consecutive positions (one global batch) then mix the items of `window` shards, and a worker touches only
those shards until the block is used up (locality on network storage). Each epoch has its own shard order
and its own Feistel keys, so the data is reshuffled every epoch; since each epoch is a bijection onto
[0, N), positions that differ in their offset never repeat an item, whatever the ranks and workers.
"""

from __future__ import annotations

import bisect

import numpy as np

from .positions import derive_seed

__all__ = ["BlockOrder", "FeistelPermutation"]

_STREAM_SHARDS, _STREAM_BLOCK = 0x53484152, 0x424C4F4B  # "SHAR", "BLOK"
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: the round function of the Feistel network."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A keyed bijection of [0, n) with O(1) memory: a 4-round balanced Feistel network on the smallest
    even number of bits that covers n, with cycle walking (an output >= n is permuted again; it ends
    because the network is a bijection on the larger domain, after < 4 rounds on average)."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [derive_seed(key, r) for r in range(4)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} is outside [0, {self.n})")
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class BlockOrder:
    """Offset within an epoch -> dataset index, for data stored as shards of `counts[s]` items.

    Dataset indices are shard-major (shard 0's items first). `window` shards are mixed per block; with
    `shuffle=False` the order is the stored one (offset == index)."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int, window: int, shuffle: bool = True) -> None:
        counts = np.asarray(counts, dtype=np.int64)  # [S]
        self.n = int(counts.sum())
        self.shuffle = shuffle
        if not shuffle:
            return
        self.seed, self.epoch = int(seed), int(epoch)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [S] first dataset index of each shard
        rng = np.random.default_rng(derive_seed(seed, epoch, _STREAM_SHARDS))
        self.shard_order = rng.permutation(len(counts))  # [S] position in this epoch -> shard
        self.shard_start = starts[self.shard_order]  # [S]
        self.epoch_cum = np.concatenate([[0], np.cumsum(counts[self.shard_order])])  # [S + 1]
        self.window = max(1, int(window))
        self.block_start = self.epoch_cum[:: self.window].tolist()  # [n_blocks (+1)] offsets where blocks begin
        if self.block_start[-1] != self.n:
            self.block_start.append(self.n)
        self._perms: dict[int, FeistelPermutation] = {}

    def __len__(self) -> int:
        return self.n

    def _perm(self, block: int) -> FeistelPermutation:
        perm = self._perms.get(block)
        if perm is None:
            if len(self._perms) > 64:  # a worker moves through blocks in order: keep a few
                self._perms.clear()
            size = self.block_start[block + 1] - self.block_start[block]
            perm = FeistelPermutation(size, derive_seed(self.seed, self.epoch, block, _STREAM_BLOCK))
            self._perms[block] = perm
        return perm

    def __getitem__(self, offset: int) -> int:
        if not 0 <= offset < self.n:
            raise IndexError(f"offset {offset} is outside the epoch [0, {self.n})")
        if not self.shuffle:
            return int(offset)
        block = bisect.bisect_right(self.block_start, offset) - 1
        first = self.block_start[block]
        k = first + self._perm(block)(offset - first)  # offset within the epoch after mixing the block
        j = int(np.searchsorted(self.epoch_cum, k, side="right")) - 1  # j-th shard of this epoch
        return int(self.shard_start[j] + (k - self.epoch_cum[j]))
