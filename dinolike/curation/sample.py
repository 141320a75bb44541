"""Step 4, `sample`: hierarchical k-means with balanced sampling, for curation without seeds.

Following "Automatic Data Curation for Self-Supervised Learning" (Vo et al., 2024), the DINOv2 follow-up:
level 1 clusters the images, level l > 1 clusters the centroids of level l-1. A target size is then split
top-down: every cluster of a level gets an equal share of its parent's budget, capped by the number of
images under it, with what the small clusters cannot use handed to the others (water-filling). The
result is flat over concepts instead of following the pool's long tail.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .index import assign, kmeans

__all__ = ["hierarchical_kmeans", "balanced_quota", "balanced_sample", "group_members"]


def group_members(labels: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Indices of each label 0..n_groups-1 (one stable sort instead of a full scan per group)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=n_groups))
    return np.split(order, bounds[:-1])


def hierarchical_kmeans(
    x: np.ndarray, levels: list[int], niter: int = 20, seed: int = 0, gpu: Any = "auto"
) -> list[np.ndarray]:
    """Parent ids per level: out[0] [N] maps images to level-1 clusters, out[l] maps level-l clusters to
    level-(l+1) clusters. Cluster counts are clipped to the number of items of the level below."""
    parents, items = [], x
    for level, k in enumerate(levels):
        k = min(int(k), len(items))
        centroids = kmeans(items, k, niter=niter, seed=seed + level, gpu=gpu)
        ids, _ = assign(items, centroids)
        used, ids = np.unique(ids, return_inverse=True)  # drop empty clusters so ids stay dense
        parents.append(ids.astype(np.int64))
        items = centroids[used]
    return parents


def balanced_quota(budget: int, capacity: np.ndarray) -> np.ndarray:
    """Split `budget` over groups as evenly as possible without exceeding each group's `capacity` [G]."""
    capacity = np.asarray(capacity, dtype=np.int64)
    quota = np.zeros_like(capacity)
    budget = min(int(budget), int(capacity.sum()))
    open_ = capacity > 0
    while budget > 0 and open_.any():
        idx = np.flatnonzero(open_)
        share = budget // len(idx)
        if share == 0:  # fewer units than groups: one each to the groups with the most room left
            room = capacity[idx] - quota[idx]
            top = idx[np.argsort(-room, kind="stable")[:budget]]
            quota[top] += 1
            break
        add = np.minimum(share, capacity[idx] - quota[idx])
        quota[idx] += add
        budget -= int(add.sum())
        open_ = quota < capacity
    return quota


def balanced_sample(
    parents: list[np.ndarray], target: int, seed: int = 0, pick: str = "random", sims: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Image ids (sorted) of a balanced sample of about `target` images, and their level-1 cluster ids.

    pick: within a level-1 cluster, `random` images or the `closest` to its centroid (`sims` [N]: each
    image's cosine to its centroid), the paper's two strategies."""
    if pick not in ("random", "closest") or (pick == "closest" and sims is None):
        raise ValueError(f"pick must be random, or closest with sims given; got {pick!r}")
    rng = np.random.default_rng(seed)
    # images under each cluster, per level (level 0 = the images themselves)
    counts = [np.bincount(parents[0])]
    for p in parents[1:]:
        counts.append(np.bincount(p, weights=counts[-1]).astype(np.int64))
    top = len(parents) - 1
    quota = balanced_quota(target, counts[top])  # budget per top-level cluster
    for level in range(top, 0, -1):  # push budgets down to level-1 clusters
        child_parent = parents[level]  # [clusters of the level below] -> cluster at `level`
        kids_of = group_members(child_parent, len(quota))
        child_quota = np.zeros(len(child_parent), dtype=np.int64)
        for c in np.flatnonzero(quota):
            kids = kids_of[c]
            child_quota[kids] = balanced_quota(quota[c], counts[level - 1][kids])
        quota = child_quota
    members_of = group_members(parents[0], len(quota))
    picked = []
    for c in np.flatnonzero(quota):  # quota[c] images within each level-1 cluster
        members = members_of[c]
        if pick == "random":
            picked.append(rng.choice(members, int(quota[c]), replace=False))
        else:
            picked.append(members[np.argsort(-sims[members], kind="stable")[: int(quota[c])]])
    ids = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    return ids.astype(np.int64), parents[0][ids]
