"""The `retrieve` and `sample` steps, sharded over the memory-mapped deduplicated pool.

retrieve:
- sample-based: the seeds (small, in memory) are the queries, split into parts over ranks; each part is
  searched against the pool index `dedup` built (restricted to kept images by a bitmap, candidates re-scored
  exactly), or exactly block by block when the pool is small;
- cluster-based: distributed k-means over a random sample of the kept pool (curation/hkmeans.py), every kept
  image assigned part by part, then (rank 0) the clusters that hold more than `min_seeds` seeds give up to
  `per_cluster` images each.
sample: hierarchical k-means with resampling over the whole kept pool (level 1 distributed, checkpointed per
  level and iteration; with `sample.level1_split` S > 1 made in two steps, split_kmeans.py), every kept image
  assigned part by part (or by the splits), then the balanced draw on rank 0.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from .config import section_fingerprint
from .dedup_step import dedup_index, load_keep
from .embed_step import load_set, set_specs, shard_set
from .hkmeans import KMeansPlan, hierarchical, kmeans
from .index import assign
from .parts import PartSet, Ranks, ranks
from .retrieve import best_per_image, pick_from_clusters
from .rows import ArrayRows, EmbeddingView, SubsetRows, open_view
from .sample import balanced_sample
from .search import exact_knn, rerank
from .split_kmeans import split_level
from .store import StepOutputError, save_npz, write_json
from .workdir import done, embeddings_fingerprint, prune_work, require, step_dir, up_to_date, work_dir

__all__ = ["step_retrieve", "step_sample", "SAMPLE_METHOD", "CLUSTER_METHOD"]

log = logging.getLogger(__name__)
SAMPLE_METHOD, CLUSTER_METHOD = 0, 1


def _assign_parts(rows: ArrayRows, centroids: np.ndarray, parts: PartSet, r: Ranks, chunk: int) -> None:
    """Nearest centroid (cluster [m] int32, cosine [m] float32) of every row, one file per part."""
    for p in parts.mine(r):
        a, b = parts.bounds(p)
        cl, sim = np.empty(b - a, np.int32), np.empty(b - a, np.float32)
        for s, x in rows.slices(chunk, a, b):
            ids, sims = assign(x, centroids)
            cl[s - a : s - a + len(x)], sim[s - a : s - a + len(x)] = ids, sims
        parts.write(p, cluster=cl, sim=sim)


def _neighbours(cfg: DictConfig, pool: EmbeddingView, keep: np.ndarray, seeds: np.ndarray, parts: PartSet,
                r: Ranks) -> None:
    """k nearest kept pool images of each seed, one file per part of the seeds."""
    k, chunk = int(cfg.retrieve.k), int(cfg.scale.chunk_rows)
    index = dedup_index(cfg)
    for p in parts.mine(r):
        a, b = parts.bounds(p)
        xq = seeds[a:b]
        if index is None:
            sims, ids = exact_knn(pool, xq, k, chunk, allowed=keep)  # [q, k]
        else:  # approximate candidates (4k of them), exact cosines, best k kept
            cs, ci = index.search(xq, 4 * k, keep)
            qrow = np.broadcast_to(np.arange(len(xq))[:, None], ci.shape)
            ok = ci >= 0
            exact = np.full(ci.shape, -np.inf, np.float32)
            exact[ok] = rerank(pool, xq, qrow[ok], ci[ok])
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            sims, ids = np.take_along_axis(exact, order, 1), np.take_along_axis(ci, order, 1)
            ids[~np.isfinite(sims)] = -1
        parts.write(p, sims=sims, ids=ids)


def step_retrieve(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Sample- and cluster-based retrieval from the seeds into the deduplicated pool (module docstring)."""
    if not set_specs(cfg, "seeds"):
        raise StepOutputError("`retrieve` needs seed images: set `seeds` (a list of dataset specs)")
    methods = list(cfg.retrieve.methods)
    fp = section_fingerprint(cfg.retrieve, cfg.index, cfg.seed, cfg.scale.part_rows,
                             require(cfg, "dedup", "retrieve")["fingerprint"], embeddings_fingerprint(cfg, ("seeds",)))
    if up_to_date(cfg, "retrieve", fp, force):
        return done(cfg, "retrieve")["summary"]
    r, t0, rc = ranks(), time.perf_counter(), cfg.retrieve
    pool = r.together(lambda: open_view(shard_set(cfg, "pool")))
    seeds, keep = load_set(cfg, "seeds")[0], load_keep(cfg)  # seeds [S, D] (small); keep [N] bool
    kept = np.flatnonzero(keep)
    work = work_dir(cfg, "retrieve", fp)
    part_rows, chunk = int(cfg.scale.part_rows), int(cfg.scale.chunk_rows)
    nn_parts = PartSet(work / "neighbours", len(seeds), part_rows, fp)
    if "sample" in methods:
        r.together(lambda: _neighbours(cfg, pool, keep, seeds, nn_parts, r))
    cl_parts = PartSet(work / "clusters", len(kept), part_rows, fp)
    n_clusters = min(int(rc.n_clusters), len(kept))
    centroids = None
    if "cluster" in methods:
        rng = np.random.default_rng(int(cfg.seed))
        n_train = min(len(kept), n_clusters * int(rc.kmeans_train_per_cluster))
        train = SubsetRows(pool, np.sort(rng.choice(kept, n_train, replace=False)))
        plan = KMeansPlan(n_clusters, int(rc.kmeans_iters), 0, 1, chunk)
        centroids = r.together(lambda: kmeans(train, plan, int(cfg.seed), r, work / "kmeans.npz"))
        r.together(lambda: _assign_parts(SubsetRows(pool, kept), centroids, cl_parts, r, chunk))
    summary: dict[str, Any] | None = None
    if r.main:
        summary = r.together(lambda: _retrieve_merge(cfg, kept, seeds, centroids, nn_parts, cl_parts, fp, t0))
    else:
        r.together(lambda: None)
    return r.agree(summary)


def _retrieve_merge(cfg: DictConfig, kept: np.ndarray, seeds: np.ndarray, centroids: np.ndarray | None,
                    nn_parts: PartSet, cl_parts: PartSet, fp: str, t0: float) -> dict[str, Any]:
    rc, methods = cfg.retrieve, list(cfg.retrieve.methods)
    summary: dict[str, Any] = {"seeds": len(seeds), "pool_after_dedup": len(kept)}
    found = []
    if "sample" in methods:  # ids are pool rows already
        got = best_per_image(nn_parts.all("sims"), nn_parts.all("ids"), float(rc.min_similarity))
        found.append((SAMPLE_METHOD, got))
        summary["sample_based"] = len(got.ids)
    if "cluster" in methods:
        seed_c, _ = assign(seeds, centroids)
        got, stats = pick_from_clusters(cl_parts.all("cluster").astype(np.int64), seed_c, len(centroids),
                                        int(rc.min_seeds), int(rc.per_cluster), int(cfg.seed))
        got.ids = kept[got.ids]  # rows of the kept pool -> pool rows
        found.append((CLUSTER_METHOD, got))
        summary.update({"cluster_based": len(got.ids), **{f"cluster_{k}": v for k, v in stats.items()}})
    cols: dict[str, list[np.ndarray]] = {"ids": [], "method": [], "source": [], "score": [], "rank": []}
    for method, got in found:
        cols["ids"].append(got.ids)
        cols["method"].append(np.full(len(got.ids), method, np.int64))
        cols["source"].append(got.source)
        cols["score"].append(got.score)
        cols["rank"].append(got.rank)
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    summary["union"] = int(len(np.unique(arrays["ids"])))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    save_npz(step_dir(cfg, "retrieve") / "result.npz", **arrays)
    write_json(step_dir(cfg, "retrieve") / "done.json", {"fingerprint": fp, "summary": summary})
    prune_work(cfg, "retrieve", fp)
    return summary


def sample_plans(cfg: DictConfig) -> list[KMeansPlan]:
    s = cfg.sample
    return [KMeansPlan(int(k), int(s.kmeans_iters), int(rs), int(ss), int(cfg.scale.chunk_rows))
            for k, rs, ss in zip(s.levels, s.resample_steps, s.sample_size, strict=True)]


def step_sample(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Hierarchical k-means with resampling over the deduplicated pool, then a balanced draw (docstring)."""
    fp = section_fingerprint(cfg.sample, cfg.index.gpu, cfg.seed, cfg.scale.part_rows,
                             require(cfg, "dedup", "sample")["fingerprint"])
    if up_to_date(cfg, "sample", fp, force):
        return done(cfg, "sample")["summary"]
    r, t0 = ranks(), time.perf_counter()
    pool = r.together(lambda: open_view(shard_set(cfg, "pool")))
    kept = np.flatnonzero(load_keep(cfg))
    rows = SubsetRows(pool, kept)
    plans = sample_plans(cfg)
    work = work_dir(cfg, "sample", fp)
    split = int(cfg.sample.level1_split)
    level1 = (r.together(lambda: split_level(rows, plans[0], split, int(cfg.seed), r, work / "split"))
              if split > 1 else None)
    cents, parents = r.together(lambda: hierarchical(rows, plans, int(cfg.seed), r, work,
                                                     None if level1 is None else level1.centroids))
    t_kmeans = time.perf_counter() - t0
    parts = PartSet(work / "assign", len(kept), int(cfg.scale.part_rows), fp)
    if level1 is None:  # the split gave every row its level-1 cluster already
        r.together(lambda: _assign_parts(rows, cents[0], parts, r, int(cfg.scale.chunk_rows)))
    summary: dict[str, Any] | None = None
    if r.main:
        def merge() -> dict[str, Any]:
            if level1 is None:
                leaf, sim = parts.all("cluster").astype(np.int64), parts.all("sim")  # [M] of every kept image
            else:
                leaf, sim = level1.labels()
            ids, cl = balanced_sample([leaf, *parents], int(cfg.sample.target), int(cfg.seed), str(cfg.sample.pick),
                                      sim)
            out = {"pool_after_dedup": len(kept), "levels": [len(c) for c in cents],
                   "nonempty_level1": int(len(np.unique(leaf))), "sampled": len(ids), "ranks": r.world,
                   "kmeans_seconds": round(t_kmeans, 2), "seconds": round(time.perf_counter() - t0, 2)}
            save_npz(step_dir(cfg, "sample") / "result.npz", ids=kept[ids], cluster=cl, pool_ids=kept,
                     pool_cluster=leaf)
            write_json(step_dir(cfg, "sample") / "done.json", {"fingerprint": fp, "summary": out})
            prune_work(cfg, "sample", fp)
            return out
        summary = r.together(merge)
    else:
        r.together(lambda: None)
    return r.agree(summary)
