"""Synthetic embedded pools with known copies, written straight into a work dir's shard format.

For tests and benchmarks of the steps after `embed` at sizes no image folder here could reach (10M x 384 is
15 GB): clustered unit vectors (`n / 100` centres, within-cluster cosine ~0.5) with a fraction of rows
overwritten by near-copies (cosine ~0.95) of other rows of the same shard. Generated shard by shard from
(seed, shard) so memory stays at one shard whatever the size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import ShardSet

__all__ = ["write_synthetic_set", "synthetic_shard"]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _centres(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    return _unit(rng.standard_normal((max(1, min(n // 100, 100_000)), dim), dtype=np.float32))  # [C, D]


def synthetic_shard(
    i: int, rows: int, centres: np.ndarray, copy_frac: float, seed: int, offset: int
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [rows, D], copy pairs [c, 2] as global (copy row, source row)) of shard i."""
    rng = np.random.default_rng([seed, 1, i])
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), rows)] + rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
    x = _unit(x)
    n_copies = int(round(rows * copy_frac))
    pos = rng.permutation(rows)
    dst, src = pos[:n_copies], pos[n_copies : 2 * n_copies]  # distinct rows: a copy never copies a copy
    x[dst] = _unit(x[src] + 0.3 * rng.standard_normal((len(dst), dim), dtype=np.float32) / np.sqrt(dim))
    return x, np.stack([dst + offset, src + offset], 1).astype(np.int64)


def write_synthetic_set(
    root: str | Path, n: int, dim: int, shard_size: int, copy_frac: float = 0.05, seed: int = 0,
    centres_of: int | None = None, use_centres: int | None = None,
) -> np.ndarray:
    """Write a complete embedded set (items.json, shards, markers) of n rows under `root`; returns the
    injected copy pairs [C, 2] (copy row, source row). Seeds for retrieval: `centres_of` = the pool's size
    (same centres as the pool) and `use_centres` = how many of them the seeds gather around."""
    shards = ShardSet(root)
    n_shards = -(-n // shard_size)
    centres = _centres(centres_of or n, dim, seed)[:use_centres]
    pairs = []
    for i in range(n_shards):
        a = i * shard_size
        rows = min(shard_size, n - a)
        if shards._marker_info(i) is None:  # a rerun completes an interrupted set
            x, cp = synthetic_shard(i, rows, centres, copy_frac, seed, a)
            names = [f"synthetic/{j:09d}.jpg" for j in range(a, a + rows)]
            shards.write_shard(i, x, names, [-1] * rows, [], "synthetic")
        else:
            cp = synthetic_shard(i, rows, centres, copy_frac, seed, a)[1]
        pairs.append(cp)
    shards.write_items({"specs": [f"synthetic:{n}x{dim}:{seed}"], "shard_size": shard_size, "n_items": n,
                        "n_shards": n_shards})
    return np.concatenate(pairs)
