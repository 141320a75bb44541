"""Distributed spherical k-means and hierarchical k-means with resampling (Vo et al., 2024).

k-means (Lloyd) across ranks: every rank holds a contiguous slice of the rows (a memory-mapped pool, read
in chunks), assigns them to the current centroids and sums them per cluster; the sums [K, D] and counts [K]
are all-reduced, and every rank takes the same new centroids (normalised sums: spherical k-means, cosine
like the rest of curation). Sums are float64 so the result does not depend on how the rows are split: W
ranks give the one-process centroids up to float rounding. The initial centroids are K rows drawn with the
seed, the same on every rank.

Resampling (the paper's remedy for k-means' pull towards dense regions): after the Lloyd iterations of a
level, each resampling step takes the `sample_size` rows closest to each centroid and moves the centroid
to their (normalised) mean, then reassigns. Level l > 1 clusters the centroids of level l - 1.

Checkpoints: rank 0 writes the centroids after every iteration and resampling step (`level_L.npz`, atomic);
a killed run resumes at the step after the last one written, and a finished level is not recomputed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .index import assign
from .parts import Ranks
from .rows import ArrayRows
from .selfjoin import top_k_per_row
from .store import save_npz

__all__ = ["KMeansPlan", "kmeans", "closest_per_cluster", "hierarchical", "my_slice", "slice_of"]

log = logging.getLogger(__name__)


class KMeansPlan:
    """One level's settings: clusters, Lloyd iterations, resampling steps, rows kept per cluster when
    resampling, and the assignment chunk (rows read at once: bounds memory)."""

    def __init__(self, k: int, niter: int, resample_steps: int, sample_size: int, chunk: int) -> None:
        self.k, self.niter, self.resample_steps = int(k), int(niter), int(resample_steps)
        self.sample_size, self.chunk = int(sample_size), int(chunk)

    @property
    def steps(self) -> int:
        return self.niter + self.resample_steps


def slice_of(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous rows [a, b) of `rank` of `world`: equal slices, the remainder spread over the first ranks."""
    base, extra = divmod(n, world)
    a = rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


def my_slice(n: int, r: Ranks) -> tuple[int, int]:
    """This rank's contiguous rows [a, b)."""
    return slice_of(n, r.rank, r.world)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _lloyd_step(src: ArrayRows, centroids: np.ndarray, r: Ranks, chunk: int) -> np.ndarray:
    """One all-reduced Lloyd iteration; an empty cluster keeps its centroid."""
    k, d = centroids.shape
    sums = torch.zeros(k, d, dtype=torch.float64)  # [K, D]
    counts = np.zeros(k, np.int64)  # [K]
    a, b = my_slice(len(src), r)
    for _, x in src.slices(chunk, a, b):
        ids, _ = assign(x, centroids)  # [c]
        sums.index_add_(0, torch.from_numpy(ids), torch.from_numpy(x.astype(np.float64)))
        counts += np.bincount(ids, minlength=k)
    sums_np, counts = r.sum(sums.numpy()), r.sum(counts)
    new = _unit(sums_np)
    empty = counts == 0
    new[empty] = centroids[empty]
    return new


def closest_per_cluster(src: ArrayRows, centroids: np.ndarray, s: int, r: Ranks, chunk: int) -> np.ndarray:
    """Row ids [M] of the s rows closest to each centroid, over all ranks (ties: lower row id first)."""
    a, b = my_slice(len(src), r)
    keep_c, keep_i, keep_s = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start, x in src.slices(chunk, a, b):
        ids, sims = assign(x, centroids)
        keep_c, keep_i, keep_s = (np.concatenate([keep_c, ids]),
                                  np.concatenate([keep_i, np.arange(start, start + len(x))]),
                                  np.concatenate([keep_s, sims]))
        sel = top_k_per_row(keep_c, keep_i, keep_s, s)  # per cluster, its s best so far
        keep_c, keep_i, keep_s = keep_c[sel], keep_i[sel], keep_s[sel]
    got = r.gather((keep_c, keep_i, keep_s))
    c, i, sim = (np.concatenate([g[j] for g in got]) for j in range(3))
    return np.sort(i[top_k_per_row(c, i, sim, s)])


def _resample_step(src: ArrayRows, centroids: np.ndarray, plan: KMeansPlan, r: Ranks) -> np.ndarray:
    """Centroids moved to the mean of the `sample_size` rows closest to each (an empty cluster stays)."""
    picked = closest_per_cluster(src, centroids, plan.sample_size, r, plan.chunk)  # [M]
    x = src.take(picked)  # [M, D], M <= K * sample_size
    ids, _ = assign(x, centroids)
    sums = torch.zeros(centroids.shape, dtype=torch.float64).index_add_(0, torch.from_numpy(ids),
                                                                         torch.from_numpy(x.astype(np.float64)))
    new = _unit(sums.numpy())
    empty = np.bincount(ids, minlength=len(centroids)) == 0
    new[empty] = centroids[empty]
    return new


def kmeans(src: ArrayRows, plan: KMeansPlan, seed: int, r: Ranks, ckpt: Path | None = None) -> np.ndarray:
    """Centroids [K, D] of `src` (all ranks pass the same `src`, each works on its slice); checkpointed in
    `ckpt` (a .npz path) after every step when given."""
    n = len(src)
    if not 1 <= plan.k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n rows, got k={plan.k} for {n} rows")
    step, centroids = 0, None
    if ckpt is not None and ckpt.is_file():
        with np.load(ckpt) as z:
            step, centroids = int(z["step"]), z["centroids"]
        log.info("k-means %s: resumed after step %d of %d", ckpt.name, step, plan.steps)
    if centroids is None:
        rng = np.random.default_rng(seed)
        centroids = _unit(src.take(np.sort(rng.choice(n, plan.k, replace=False))))  # [K, D]
    while step < plan.steps:
        if step < plan.niter:
            centroids = _lloyd_step(src, centroids, r, plan.chunk)
        else:
            centroids = _resample_step(src, centroids, plan, r)
        step += 1
        if ckpt is not None and r.main:
            save_npz(ckpt, step=np.int64(step), centroids=centroids)
    return centroids


def hierarchical(
    src: ArrayRows, plans: list[KMeansPlan], seed: int, r: Ranks, ckpt_dir: Path | None = None,
    level1: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(centroids per level, parents per level > 1): parents[l - 1] [K_{l-1}] maps each level-(l-1) centroid to
    its level-l cluster. Assigning the rows to level 1 is left to the caller (it is a sharded pass).
    `level1`: level 1's centroids when the caller made them (split_kmeans.py), else level 1 is a k-means here."""
    cents: list[np.ndarray] = []
    parents: list[np.ndarray] = []
    items: ArrayRows = src
    for level, plan in enumerate(plans):
        plan = KMeansPlan(min(plan.k, len(items)), plan.niter, plan.resample_steps, plan.sample_size, plan.chunk)
        done = None if ckpt_dir is None else ckpt_dir / f"level_{level + 1}.done.npz"
        if level == 0 and level1 is not None:
            c = level1
        elif done is not None and done.is_file():
            with np.load(done) as z:
                c = z["centroids"]
        else:
            ck = None if ckpt_dir is None else ckpt_dir / f"level_{level + 1}.npz"
            c = kmeans(items, plan, seed + level, r, ck)
            if done is not None and r.main:
                save_npz(done, centroids=c)
            r.barrier()
        if level:
            parents.append(assign(items.x, c)[0])
        cents.append(c)
        items = ArrayRows(c)
    return cents, parents
