"""The `dedup` step, sharded: the pool is never loaded whole, each part of it is searched and committed alone.

1. index (approximate kinds only): trained on a sample by rank 0, filled part by part by every rank, merged
   on disk by rank 0 (curation/search.py);
2. search: for each part of the pool, each image's k nearest pool images (exact cosines above the threshold
   become edges) and its nearest reference image: `part_XXXXX.npz` (src, dst, ref_sim, ref_id);
3. merge (rank 0, small): the union of the edges -> connected components -> keep / leak, as in DINOv2
   (curation/dedup.py), written as `result.npz` like the one-process step wrote it.
A killed step resumes at the first unfinished part of whichever stage it was in.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from .config import section_fingerprint
from .dedup import DedupResult
from .embed_step import load_set, set_specs, shard_set
from .index import build_index
from .index import search as search_index
from .parts import PartSet, Ranks, ranks
from .rows import EmbeddingView, open_view
from .search import ShardedIndex, exact_knn, rerank, search_kind
from .store import save_npz, write_json
from .unionfind import connected_components
from .workdir import done, embeddings_fingerprint, prune_work, require, step_dir, up_to_date, work_dir

__all__ = ["step_dedup", "load_dedup", "pool_index", "search_part", "dedup_fingerprint"]

log = logging.getLogger(__name__)
_RERANK_PAIRS = 1 << 16  # candidate pairs re-scored at once: at most 65,536 rows gathered (100 MB at D = 384)


def dedup_fingerprint(cfg: DictConfig) -> str:
    return section_fingerprint(cfg.dedup, cfg.index, cfg.seed, cfg.scale.part_rows,
                               embeddings_fingerprint(cfg, ("pool", "references")))


def pool_index(cfg: DictConfig, pool: EmbeddingView, fp: str, r: Ranks) -> ShardedIndex | None:
    """The approximate index over the whole pool (None when the search is exact): train, add, merge."""
    n = len(pool)
    kind = search_kind(n, n, cfg.index)
    if kind == "flat":
        return None
    root = work_dir(cfg, "dedup", fp) / "index"
    index = ShardedIndex(root, cfg.index, kind)
    if index.merged_path.is_file():
        return index
    if r.main:
        r.together(lambda: index.train(pool, n, int(cfg.seed)))
    else:
        r.together(lambda: None)
    adds = PartSet(root, n, int(cfg.scale.part_rows), fp)
    r.together(lambda: index.add(pool, adds, r, int(cfg.scale.chunk_rows)))
    r.together(lambda: index.merge(adds) if r.main else None)
    return index


def search_part(
    pool: EmbeddingView, a: int, b: int, k: int, threshold: float, margin: float, index: ShardedIndex | None,
    chunk: int, allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges (src [E], dst [E]) from rows [a, b) of the pool to their k nearest pool rows with exact cosine
    above `threshold`; and how many candidate pairs were re-scored (the cost PQ adds)."""
    srcs, dsts, n_cand = [], [], 0
    for s, xq in pool.slices(chunk, a, b):
        if index is None:
            sims, ids = exact_knn(pool, xq, k + 1, allowed=allowed)  # [c, k+1] exact: +1 for the image itself
            floor = threshold
        else:
            sims, ids = index.search(xq, k + 1, allowed)  # approximate cosines
            floor = threshold - margin
        rows = np.broadcast_to(np.arange(s, s + len(xq))[:, None], ids.shape)
        hit = (ids >= 0) & (ids != rows) & (sims > floor)
        src, dst = rows[hit], ids[hit]
        if index is not None:  # the decision is taken on exact cosines, read from the memory-mapped floats
            n_cand += len(src)
            keep = np.zeros(len(src), bool)
            for e in range(0, len(src), _RERANK_PAIRS):  # bounded gathers: candidates near the threshold can
                sl = slice(e, e + _RERANK_PAIRS)  # be dozens per image on real (and these synthetic) pools
                keep[sl] = rerank(pool, xq, src[sl] - s, dst[sl]) > threshold
            src, dst = src[keep], dst[keep]
        srcs.append(src)
        dsts.append(dst)
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    n = len(pool)
    pairs = np.unique(np.minimum(src, dst) * n + np.maximum(src, dst))  # i->j and j->i are one edge
    return pairs // n, pairs % n, n_cand


def _references(cfg: DictConfig, n_queries: int) -> tuple[Any, int] | None:
    """An index over the reference sets (held in memory: eval sets are small next to the pool)."""
    if not set_specs(cfg, "references"):
        return None
    refs = load_set(cfg, "references")[0]  # [M, D]
    if not len(refs):
        return None
    return build_index(refs, cfg.index, seed=int(cfg.seed), what="reference set", n_queries=n_queries), len(refs)


def _search_parts(cfg: DictConfig, pool: EmbeddingView, parts: PartSet, index: ShardedIndex | None,
                  r: Ranks) -> None:
    d = cfg.dedup
    refs = _references(cfg, len(pool))
    for p in parts.mine(r):
        a, b = parts.bounds(p)
        t0 = time.perf_counter()
        src, dst, n_cand = search_part(pool, a, b, int(d.k), float(d.threshold), float(cfg.index.rerank_margin),
                                       index, int(cfg.scale.chunk_rows))
        ref_sim = np.full(b - a, -np.inf, np.float32)
        ref_id = np.full(b - a, -1, np.int64)
        if refs is not None:
            for s, xq in pool.slices(int(cfg.scale.chunk_rows), a, b):
                sims, ids = search_index(refs[0], xq, 1)
                ref_sim[s - a : s - a + len(xq)] = sims[:, 0]
                ref_id[s - a : s - a + len(xq)] = np.where(sims[:, 0] > float(d.ref_threshold), ids[:, 0], -1)
        parts.write(p, src=src, dst=dst, ref_sim=ref_sim, ref_id=ref_id, candidates=np.int64(n_cand))
        log.info("dedup part %d/%d (rows %d-%d): %d edges, %.1f s", p + 1, parts.n_parts, a, b, len(src),
                 time.perf_counter() - t0)


def _merge(cfg: DictConfig, n: int, parts: PartSet, kind: str) -> dict[str, Any]:
    """Connected components of every part's edges, reference leaks, keep; written as result.npz."""
    src, dst = parts.all("src"), parts.all("dst")
    pairs = np.unique(src * n + dst)  # an edge found from both of its ends is one edge
    src, dst = pairs // n, pairs % n
    component = connected_components(n, src, dst)  # [N]
    ref_sim, ref_id = parts.all("ref_sim"), parts.all("ref_id")
    bad_comp = np.zeros(n, dtype=bool)
    bad_comp[component[ref_id >= 0]] = True
    leak = bad_comp[component]
    keep = (component == np.arange(n)) & ~leak
    res = DedupResult(keep, component, leak, ref_sim, ref_id, len(src))
    out = step_dir(cfg, "dedup")
    save_npz(out / "result.npz", keep=keep, component=component, leak=leak, ref_sim=ref_sim, ref_id=ref_id,
             n_edges=np.int64(len(src)))
    n_cand = int(sum(int(parts.load(p)["candidates"]) for p in range(parts.n_parts)))
    return {**res.summary(), "index": kind, "parts": parts.n_parts, "reranked_pairs": n_cand}


def step_dedup(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Self + relative dedup of the pool, sharded over parts and ranks (see the module docstring)."""
    fp = dedup_fingerprint(cfg)
    if up_to_date(cfg, "dedup", fp, force):
        return done(cfg, "dedup")["summary"]
    r = ranks()
    t0 = time.perf_counter()
    pool = r.together(lambda: open_view(shard_set(cfg, "pool")))
    n = len(pool)
    index = pool_index(cfg, pool, fp, r)
    t_index = time.perf_counter() - t0
    parts = PartSet(work_dir(cfg, "dedup", fp) / "parts", n, int(cfg.scale.part_rows), fp)
    r.together(lambda: _search_parts(cfg, pool, parts, index, r))
    summary = None
    if r.main:
        summary = r.together(lambda: _merge(cfg, n, parts, search_kind(n, n, cfg.index)))
        summary.update(index_seconds=round(t_index, 2), seconds=round(time.perf_counter() - t0, 2), ranks=r.world)
        write_json(step_dir(cfg, "dedup") / "done.json", {"fingerprint": fp, "summary": summary})
        prune_work(cfg, "dedup", fp)
    else:
        r.together(lambda: None)
    return r.agree(summary)


def load_dedup(cfg: DictConfig) -> DedupResult:
    require(cfg, "dedup", "this step")
    with np.load(step_dir(cfg, "dedup") / "result.npz") as z:
        return DedupResult(z["keep"], z["component"], z["leak"], z["ref_sim"], z["ref_id"], int(z["n_edges"]))


def load_keep(cfg: DictConfig) -> np.ndarray:
    """[N] bool: the deduplicated pool (what retrieve and sample run on)."""
    require(cfg, "dedup", "this step")
    with np.load(step_dir(cfg, "dedup") / "result.npz") as z:
        return z["keep"]


def dedup_index(cfg: DictConfig) -> ShardedIndex | None:
    """The pool index the dedup step built (None when its search was exact), for retrieval to reuse."""
    fp = require(cfg, "dedup", "retrieve")["fingerprint"]
    root = work_dir(cfg, "dedup", fp) / "index"
    if not (root / "merged.index").is_file():
        return None
    return ShardedIndex(root, cfg.index, "reuse")
