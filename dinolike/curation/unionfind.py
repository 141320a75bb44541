"""Connected components by union-find, vectorised over edge arrays (millions of edges, no Python loop).

Each round hooks, for every edge whose endpoints have different roots, the larger root under the smaller
one (`np.minimum.at` resolves conflicting hooks), then compresses every path by pointer jumping. Roots
only ever decrease, so the final root of a component is its smallest node: the label is deterministic and
"keep the root" keeps the first image (in pool order) of each group of copies.
"""

from __future__ import annotations

import numpy as np

__all__ = ["connected_components"]


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label [n] int64 of each node, equal to the smallest node index in its component.

    src, dst: [E] int node ids of undirected edges (duplicates and self-loops allowed).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if src.shape != dst.shape:
        raise ValueError(f"edge arrays differ in shape: {src.shape} vs {dst.shape}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    while src.size:
        ru, rv = parent[src], parent[dst]  # roots (parent is fully compressed here)
        live = ru != rv
        if not live.any():
            break
        src, dst, ru, rv = src[live], dst[live], ru[live], rv[live]  # settled edges never matter again
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))  # hook larger root under smaller
        parent = _compress(parent)
    return parent
