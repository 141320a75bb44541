"""Similarity self-join of a pool by inverted lists: every pair above a cosine threshold, in time ~linear in N.

Dedup needs, for each image, its k nearest pool neighbours above a threshold. A faiss IVF search does that
one query at a time (a scalar scan of each probed list). Here the work is turned around: the pool is split
into nlist = N / list_size lists (each image lives in the list of its nearest centroid); each image visits
its nprobe nearest lists; then, list by list, the block [visitors of the list, members of the list] of
cosines is one BLAS matrix product and the pairs above the threshold are read off it. Each image is compared
with ~nprobe * list_size others whatever N, and a pair (i, j) is found when j's list is among i's probes
*or* i's list among j's, which gives a higher recall than a search with the same nprobe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from .index import ivf_nlist, make_quantizer, search, train_centroids

__all__ = ["threshold_join", "top_k_per_row"]

log = logging.getLogger(__name__)
_BLOCK_COLS, _BLOCK_ENTRIES = 16384, 1 << 24  # bound one cosine block to 64 MB (a list the data piles into)


def top_k_per_row(rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the entries kept when every row keeps only its k most similar entries ([E] -> [<=E])."""
    order = np.lexsort((cols, -sims, rows))  # by row, most similar first (ties: lower column first)
    r = rows[order]
    start = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # first entry of each row in `order`
    rank = np.arange(len(r)) - np.repeat(start, np.diff(np.r_[start, len(r)]))
    return order[rank < k]


def threshold_join(
    x: np.ndarray, threshold: float, k: int, cfg: Mapping[str, Any], seed: int = 0, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i, j), i < j, where j is among the k most similar images of i with cosine > threshold, or i
    among j's (as a kNN graph cut at the threshold), restricted to pairs that share a probed list.

    x: [N, D] unit rows; cfg: the index section (list_size / nlist, nprobe, train_per_list, train_iters,
    quantizer, query_chunk). Returns (src [E], dst [E]) int64, each pair once.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nlist = ivf_nlist(n, n, cfg, "pool")
    nprobe = min(int(cfg["nprobe"]), nlist)
    rng = np.random.default_rng(seed)
    n_train = min(n, max(nlist, int(cfg["train_per_list"]) * nlist))
    train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
    quantizer = make_quantizer(train_centroids(train, nlist, int(cfg["train_iters"]), seed, cfg["gpu"]), cfg)
    del train
    _, probes = search(quantizer, x, nprobe, int(cfg["query_chunk"]), progress, "dedup lists")  # [N, P]
    probes[probes < 0] = nlist  # an HNSW quantizer may find fewer than P lists: a bin that is never read
    home = probes[:, 0]  # [N] the list each image is stored in (its nearest centroid)
    members = np.argsort(home, kind="stable")  # images grouped by list
    m_end = np.cumsum(np.bincount(home, minlength=nlist + 1))
    visits = np.argsort(probes.ravel(), kind="stable")  # (image, probe) slots grouped by list
    v_end = np.cumsum(np.bincount(probes.ravel(), minlength=nlist + 1))
    del probes, home

    buf_r: list[np.ndarray] = []
    buf_c: list[np.ndarray] = []
    buf_s: list[np.ndarray] = []
    held, compact_at = 0, max(1 << 22, 4 * n)  # entries buffered; compact to top-k per row past this

    def compact() -> None:
        nonlocal held, compact_at
        r, c, s = np.concatenate(buf_r), np.concatenate(buf_c), np.concatenate(buf_s)
        keep = top_k_per_row(r, c, s, k)
        buf_r[:], buf_c[:], buf_s[:] = [r[keep]], [c[keep]], [s[keep]]
        held = len(keep)
        compact_at = max(compact_at, 2 * held)  # geometric: compaction stays linear overall

    m_start = v_start = 0
    for lst in tqdm(range(nlist), desc="dedup join", disable=not progress, unit="list", mininterval=5):
        mem = members[m_start : m_end[lst]]  # [m] images stored in the list
        vis = visits[v_start : v_end[lst]] // nprobe  # [q] images probing it (each once)
        m_start, v_start = m_end[lst], v_end[lst]
        for m0 in range(0, len(mem), _BLOCK_COLS):  # one block per list unless the data is very skewed
            mc = mem[m0 : m0 + _BLOCK_COLS]
            xm = x[mc].T  # [D, m]
            rows = max(256, _BLOCK_ENTRIES // len(mc))
            for q0 in range(0, len(vis), rows):
                vc = vis[q0 : q0 + rows]
                sims = x[vc] @ xm  # [q, m] cosines
                qi, mi = np.nonzero(sims > threshold)
                src, dst = vc[qi], mc[mi]
                own = src != dst
                if not own.any():
                    continue
                buf_r.append(src[own])
                buf_c.append(dst[own])
                buf_s.append(sims[qi[own], mi[own]])
                held += int(own.sum())
                if held > compact_at:
                    compact()
    if not buf_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    compact()  # each image keeps its k best partners above the threshold
    r, c = buf_r[0], buf_c[0]
    lo, hi = np.minimum(r, c), np.maximum(r, c)
    pairs = np.unique(lo * n + hi)  # i->j and j->i are one edge
    log.info("self-join: %d images, %d lists, nprobe %d, %d edges", n, nlist, nprobe, len(pairs))
    return pairs // n, pairs % n
