"""Step 3, `retrieve`: grow a curated set from seed images by similarity search in the deduplicated pool.

Both DINOv2 methods:
- sample-based: for each seed, its k nearest pool images (optionally above a cosine floor);
- cluster-based: k-means over the pool; every cluster that more than `min_seeds` seeds fall into
  contributes up to `per_cluster` of its images, drawn at random (large seed sets map to whole regions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .index import assign, build_index, kmeans, search
from .sample import group_members

__all__ = ["Retrieved", "sample_based", "cluster_based", "best_per_image", "pick_from_clusters"]


@dataclass
class Retrieved:
    """Pool rows picked by one method, each with why: the seed (sample-based) or cluster (cluster-based)."""

    ids: np.ndarray  # [R] int64 rows of the searched pool
    source: np.ndarray  # [R] int64 seed index (sample) or cluster id (cluster)
    score: np.ndarray  # [R] float32 cosine to that seed, or number of seeds in that cluster
    rank: np.ndarray  # [R] int64 neighbour rank of the seed (sample) or cluster size (cluster)


def sample_based(
    pool: np.ndarray, seeds: np.ndarray, k: int, min_similarity: float, index_cfg: Mapping[str, Any], seed: int = 0,
    progress: bool = False,
) -> Retrieved:
    """k nearest pool rows of each seed; an image reached from several seeds keeps its most similar one."""
    index = build_index(pool, index_cfg, seed=seed, what="deduplicated pool", n_queries=len(seeds))
    sims, ids = search(index, seeds, k, int(index_cfg["query_chunk"]), progress, "retrieve kNN")  # [S, k]
    return best_per_image(sims, ids, min_similarity)


def best_per_image(sims: np.ndarray, ids: np.ndarray, min_similarity: float) -> Retrieved:
    """Neighbour lists (sims [S, k], ids [S, k], most similar first) -> one row per image reached, keeping
    the seed it is most similar to."""
    ranks = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    seed_ix = np.broadcast_to(np.arange(len(sims))[:, None], sims.shape)
    ok = (ids >= 0) & (sims >= min_similarity)
    ids, sims, ranks, seed_ix = ids[ok], sims[ok], ranks[ok], seed_ix[ok]
    order = np.lexsort((-sims, ids))  # by image, best similarity first
    first = np.ones(len(order), dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    pick = order[first]
    return Retrieved(ids[pick], seed_ix[pick].astype(np.int64), sims[pick], ranks[pick].astype(np.int64))


def cluster_based(
    pool: np.ndarray, seeds: np.ndarray, n_clusters: int, min_seeds: int, per_cluster: int, niter: int,
    seed: int = 0, gpu: Any = "auto", train_per_cluster: int = 64,
) -> tuple[Retrieved, dict[str, int]]:
    """Images of the clusters that hold more than `min_seeds` seeds, up to `per_cluster` each (at random).

    k-means trains on a random subsample of `train_per_cluster` images per cluster (its cost does not grow
    with the pool); every pool image is then assigned to its nearest centroid in chunks.
    """
    n_clusters = min(n_clusters, len(pool))
    centroids = kmeans(pool, n_clusters, niter=niter, seed=seed, gpu=gpu,
                       max_points_per_centroid=train_per_cluster)  # [C, D]
    pool_c, _ = assign(pool, centroids)  # [N]
    seed_c, _ = assign(seeds, centroids)  # [S]
    return pick_from_clusters(pool_c, seed_c, n_clusters, min_seeds, per_cluster, seed)


def pick_from_clusters(
    pool_c: np.ndarray, seed_c: np.ndarray, n_clusters: int, min_seeds: int, per_cluster: int, seed: int
) -> tuple[Retrieved, dict[str, int]]:
    """Given the cluster of every pool image [N] and seed [S]: the images of the clusters holding more than
    `min_seeds` seeds, up to `per_cluster` of each, drawn at random."""
    n_seeds = np.bincount(seed_c, minlength=n_clusters)  # [C]
    sizes = np.bincount(pool_c, minlength=n_clusters)
    used = np.flatnonzero(n_seeds > min_seeds)
    rng = np.random.default_rng(seed)
    members_of = group_members(pool_c, n_clusters)
    parts = []
    for c in used:
        members = members_of[c]
        if len(members) > per_cluster:
            members = np.sort(rng.choice(members, per_cluster, replace=False))
        parts.append(members)
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    cl = pool_c[ids]
    stats = {"clusters": n_clusters, "clusters_used": len(used), "seeds_in_used_clusters": int(n_seeds[used].sum())}
    return Retrieved(ids.astype(np.int64), cl.astype(np.int64), n_seeds[cl].astype(np.float32),
                     sizes[cl].astype(np.int64)), stats
