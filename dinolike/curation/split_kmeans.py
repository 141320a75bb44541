"""Level 1 of hierarchical k-means in two steps, as ssl-data-curation runs its largest level (`n_splits`):
a coarse k-means with ceil(K / S) clusters across all ranks, then each coarse cluster split into min(S, its
rows) clusters by a k-means of its own rows, in one process.

Why: one Lloyd iteration over K clusters costs N x K x D and holds [K, D] float64 sums on every rank
(800k x 1536 x 8 B = 9.8 GB at the 100M recipe's level 1). In two steps the sums are [K / S, D], a split holds
only its coarse cluster's rows, and an iteration costs N x (K / S + S) x D. The splits also give every row its
level-1 cluster and cosine, so no pass assigns N rows to K centroids.

Work files (under `work`): the coarse centroids (`coarse.npz`, checkpointed like any level), each rank's
coarse labels of its slice of rows (`coarse_rank{R}_of{W}.npy`), then the coarse clusters dealt in blocks of
`BLOCK` (block b to rank b mod W), each block written when done (`split_{b}.npz`, atomic): a killed run
redoes only its unfinished blocks. Rank 0 streams the blocks into `centroids.npy`, which every rank then
memory-maps (K x D floats need not be resident on every rank). Results do not depend on the number of ranks:
the coarse level is the all-reduced k-means, each split a one-process k-means seeded by its cluster id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .hkmeans import KMeansPlan, kmeans, my_slice, slice_of
from .index import assign
from .parts import OneRank, Ranks
from .rows import ArrayRows
from .store import atomic_write, save_npz

__all__ = ["SplitLevel", "split_level", "BLOCK"]

log = logging.getLogger(__name__)
BLOCK = 64  # coarse clusters per work unit (resume + dealing over ranks)
SPLIT_SEED = 7919  # splits are seeded seed + SPLIT_SEED + coarse id: apart from the levels' seeds (seed + level)


@dataclass
class SplitLevel:
    """Level 1 made by splitting: centroids [K', D] (memory-mapped) and where each row went."""

    centroids: np.ndarray  # [K', D] float32, K' = sum over coarse clusters of min(S, rows)
    work: Path
    n_blocks: int

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(level-1 cluster [N] int64, cosine to it [N] float32) of every row, in row order (one process)."""
        parts = []
        for b in range(self.n_blocks):
            with np.load(self.work / f"split_{b:06d}.npz") as z:
                parts.append((z["rows"], z["label"], z["sim"]))
        rows = np.concatenate([p[0] for p in parts])
        label, sim = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32)
        label[rows] = np.concatenate([p[1] for p in parts])
        sim[rows] = np.concatenate([p[2] for p in parts])
        return label, sim


def _save_npy(path: Path, a: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, a), mode="wb")


def _coarse_labels(src: ArrayRows, coarse: np.ndarray, r: Ranks, chunk: int, path: Path) -> np.ndarray:
    """This rank's slice of rows labelled with their coarse cluster [b - a] (int32), written once."""
    if path.is_file():
        return np.load(path)
    a, b = my_slice(len(src), r)
    lab = np.empty(b - a, np.int32)
    for start, x in src.slices(chunk, a, b):
        lab[start - a : start - a + len(x)] = assign(x, coarse)[0]
    _save_npy(path, lab)
    return lab


def _rows_of(work: Path, n: int, world: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, coarse labels) of the rows in coarse clusters [lo, hi), read from every rank's label file."""
    rows, labs = [], []
    for q in range(world):
        a, _ = slice_of(n, q, world)
        lab = np.load(work / f"coarse_rank{q}_of{world}.npy", mmap_mode="r")
        for s in range(0, len(lab), 1 << 24):
            part = np.asarray(lab[s : s + (1 << 24)])
            hit = np.flatnonzero((part >= lo) & (part < hi))
            rows.append(a + s + hit)
            labs.append(part[hit])
    return np.concatenate(rows), np.concatenate(labs)


def _split_block(src: ArrayRows, plan: KMeansPlan, split: int, seed: int, work: Path, world: int, b: int,
                 n_coarse: int, offsets: np.ndarray) -> None:
    lo, hi = b * BLOCK, min(n_coarse, (b + 1) * BLOCK)
    rows, labs = _rows_of(work, len(src), world, lo, hi)
    order = np.lexsort((rows, labs))  # by coarse cluster, then row id
    rows, labs = rows[order], labs[order]
    cents, labels, sims = [], [], []
    bounds = np.searchsorted(labs, np.arange(lo, hi + 1))
    for c in range(lo, hi):
        ids = rows[bounds[c - lo] : bounds[c - lo + 1]]
        if not len(ids):
            continue
        x = src.take(ids)  # [n_c, D]
        k = int(offsets[c + 1] - offsets[c])
        sub = KMeansPlan(k, plan.niter, plan.resample_steps, min(plan.sample_size, len(ids)), plan.chunk)
        cc = kmeans(ArrayRows(x), sub, seed + SPLIT_SEED + c, OneRank())  # [k, D]
        lab, sim = assign(x, cc)
        cents.append(cc)
        labels.append(offsets[c] + lab)
        sims.append(sim)
    d = src.dim
    save_npz(work / f"split_{b:06d}.npz", rows=rows,
             centroids=np.concatenate(cents) if cents else np.zeros((0, d), np.float32),
             label=np.concatenate(labels) if labels else np.zeros(0, np.int64),
             sim=np.concatenate(sims) if sims else np.zeros(0, np.float32))


def split_level(src: ArrayRows, plan: KMeansPlan, split: int, seed: int, r: Ranks, work: Path) -> SplitLevel:
    """Level 1 (`plan.k` clusters at most) as ceil(k / split) coarse clusters, each split into min(split, rows)."""
    work.mkdir(parents=True, exist_ok=True)
    n_coarse = min(len(src), -(-plan.k // split))
    coarse = kmeans(src, KMeansPlan(n_coarse, plan.niter, plan.resample_steps, plan.sample_size, plan.chunk),
                    seed, r, work / "coarse.npz")  # [K / S, D]
    lab = _coarse_labels(src, coarse, r, plan.chunk, work / f"coarse_rank{r.rank}_of{r.world}.npy")
    counts = r.sum(np.bincount(lab, minlength=n_coarse).astype(np.int64))  # [K / S] rows per coarse cluster
    offsets = np.concatenate([[0], np.cumsum(np.minimum(counts, split))])  # first level-1 id of each
    r.barrier()  # every rank's label file is written
    n_blocks = -(-n_coarse // BLOCK)
    for b in range(r.rank, n_blocks, r.world):
        if not (work / f"split_{b:06d}.npz").is_file():
            _split_block(src, plan, split, seed, work, r.world, b, n_coarse, offsets)
    r.barrier()
    out = work / "centroids.npy"
    if r.main and not out.is_file():
        tmp = work / ".centroids.npy.tmp"
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), src.dim))
        for b in range(n_blocks):
            with np.load(work / f"split_{b:06d}.npz") as z:
                c = z["centroids"]
                first = int(offsets[b * BLOCK])
                mm[first : first + len(c)] = c
        mm.flush()
        del mm
        tmp.replace(out)
    r.barrier()
    log.info("level 1: %d coarse clusters split into %d", n_coarse, int(offsets[-1]))
    return SplitLevel(np.load(out, mmap_mode="r"), work, n_blocks)
