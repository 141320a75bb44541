"""Step 2, `dedup`: self-deduplication of the pool and relative deduplication against reference sets.

As in DINOv2 (LVD-142M): each pool image is linked to those of its k = 64 nearest pool neighbours whose
cosine exceeds `threshold` (0.6); the connected components of that graph (union-find) are groups of
copies, and one image per component is kept. Relative dedup: a pool image whose nearest reference image
has cosine above `ref_threshold` (0.45) puts a reference image into its component, and such a component is
dropped whole - no copy of an evaluation image, however indirect, reaches pretraining.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .index import build_index, gpu_enabled, index_kind, iter_search, search
from .selfjoin import threshold_join
from .unionfind import connected_components

__all__ = ["DedupResult", "self_edges", "reference_matches", "deduplicate"]

log = logging.getLogger(__name__)


@dataclass
class DedupResult:
    keep: np.ndarray  # [N] bool: kept in the curated pool
    component: np.ndarray  # [N] int64: smallest pool index of the image's component
    leak: np.ndarray  # [N] bool: dropped because its component holds a reference image
    ref_sim: np.ndarray  # [N] float32: cosine to the nearest reference image (-inf without references)
    ref_id: np.ndarray  # [N] int64: that reference image (-1 without references)
    n_edges: int  # pool-pool edges above the threshold (each pair counted once)

    def summary(self) -> dict[str, int]:
        n = len(self.keep)
        n_comp = int((self.component == np.arange(n)).sum())
        return {
            "pool": n,
            "components": n_comp,
            "edges": self.n_edges,
            "kept": int(self.keep.sum()),
            "duplicates_removed": int((~self.keep & ~self.leak).sum()),
            "leaks_removed": int(self.leak.sum()),
            "direct_reference_matches": int(self.direct_matches.sum()),
        }

    @property
    def direct_matches(self) -> np.ndarray:
        return self.ref_id >= 0


def self_edges(
    emb: np.ndarray, k: int, threshold: float, index_cfg: Mapping[str, Any], seed: int = 0, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Pool-pool edges (i, j), i < j, between k-nearest neighbours with cosine > threshold: ([E], [E]).

    Exact faiss kNN while the pool is small (or on GPUs); the inverted-list self-join (curation/selfjoin.py)
    otherwise, whose cost grows linearly with the pool.
    """
    n = len(emb)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if index_kind(n, n, index_cfg) != "flat" and not gpu_enabled(index_cfg["gpu"]):
        return threshold_join(emb, threshold, k, index_cfg, seed, progress)
    index = build_index(emb, index_cfg, seed=seed, what="pool")
    src_parts, dst_parts = [], []
    for s, sims, ids in iter_search(index, emb, k + 1, int(index_cfg["query_chunk"]), progress, "dedup kNN"):
        rows = np.broadcast_to(np.arange(s, s + len(ids))[:, None], ids.shape)  # +1 above: itself
        hit = (sims > threshold) & (ids >= 0) & (ids != rows)  # [c, k+1]
        src_parts.append(rows[hit])
        dst_parts.append(ids[hit])
    src, dst = np.concatenate(src_parts), np.concatenate(dst_parts)
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    pairs = np.unique(lo * n + hi)  # i->j and j->i are one edge
    return pairs // n, pairs % n


def reference_matches(
    emb: np.ndarray, refs: np.ndarray, threshold: float, index_cfg: Mapping[str, Any], seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference of each pool image: (cosine [N], reference id [N], -1 where cosine <= threshold)."""
    index = build_index(refs, index_cfg, seed=seed, what="reference set", n_queries=len(emb))
    sims, ids = search(index, emb, 1, int(index_cfg["query_chunk"]), progress, "reference kNN")
    sim, rid = sims[:, 0], ids[:, 0]
    return sim, np.where(sim > threshold, rid, -1)


def deduplicate(
    emb: np.ndarray, refs: np.ndarray | None, cfg: Mapping[str, Any], index_cfg: Mapping[str, Any], seed: int = 0,
    progress: bool = False,
) -> DedupResult:
    """Self + relative dedup of `emb` [N, D] against `refs` [M, D] (None: self-dedup only); cfg = dedup section."""
    n = len(emb)
    src, dst = self_edges(emb, int(cfg["k"]), float(cfg["threshold"]), index_cfg, seed, progress)
    component = connected_components(n, src, dst)  # [N]
    if refs is not None and len(refs):
        ref_sim, ref_id = reference_matches(emb, refs, float(cfg["ref_threshold"]), index_cfg, seed, progress)
    else:
        ref_sim, ref_id = np.full(n, -np.inf, np.float32), np.full(n, -1, np.int64)
    bad_comp = np.zeros(n, dtype=bool)
    bad_comp[component[ref_id >= 0]] = True
    leak = bad_comp[component]
    keep = (component == np.arange(n)) & ~leak
    log.info("dedup: %d images, %d edges, %d kept, %d leaks", n, len(src), keep.sum(), leak.sum())
    return DedupResult(keep, component, leak, ref_sim.astype(np.float32), ref_id.astype(np.int64), len(src))
