"""faiss nearest-neighbour search and k-means, sized for pools from thousands to hundreds of millions.

Exact (flat inner product) search for small databases; IVF-Flat or IVF-PQ for large ones, with nlist,
nprobe and code size from the `index:` config section. On faiss-gpu with CUDA the index is sharded over all
GPUs. Queries go in chunks so the [chunk, k] result buffers bound memory whatever the pool size.
All vectors are L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

__all__ = ["set_threads", "gpu_enabled", "build_index", "search", "kmeans", "assign"]


def set_threads(n: int) -> None:
    """faiss OpenMP threads for this process; 0 keeps faiss's default (all cores)."""
    if n > 0:
        faiss.omp_set_num_threads(n)


def gpu_enabled(setting: Any) -> bool:
    """`index.gpu`: auto uses GPUs when this faiss build has them; true insists (error if it cannot)."""
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if setting in (True, "true"):
        if n_gpus == 0:
            raise RuntimeError("index.gpu=true but faiss sees no GPU (install faiss-gpu and check CUDA)")
        return True
    if setting in (False, "false"):
        return False
    if setting != "auto":
        raise ValueError(f"index.gpu must be auto, true or false, got {setting!r}")
    return n_gpus > 0


def _to_gpus(index: faiss.Index) -> faiss.Index:
    """Shard a (trained) CPU index over every visible GPU."""
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # each GPU holds 1/n of the database: memory scales with the GPU count
    return faiss.index_cpu_to_all_gpus(index, co=co)


def _default_nlist(n: int) -> int:
    # ~4 sqrt(N) lists is faiss's usual guidance; >= 39 training points per list keeps k-means sane
    return int(min(65536, max(16, min(4 * math.sqrt(n), n // 39))))


def build_index(xb: np.ndarray, cfg: Mapping[str, Any], seed: int = 0, what: str = "database") -> faiss.Index:
    """An inner-product index over `xb` [N, D] float32 with the kind chosen by `cfg` (the index section)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    kind = cfg["type"]
    if kind == "auto":
        kind = "flat" if n <= int(cfg["flat_max"]) else "ivf"
    use_gpu = gpu_enabled(cfg["gpu"])
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
        if use_gpu:
            index = _to_gpus(index)
        index.add(xb)
        return index
    if kind not in ("ivf", "ivfpq"):
        raise ValueError(f"index.type must be auto, flat, ivf or ivfpq, got {kind!r}")
    nlist = int(cfg["nlist"]) or _default_nlist(n)
    if n < nlist:
        raise ValueError(f"index.nlist={nlist} is larger than the {what} ({n} vectors); lower it or use flat")
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m = int(cfg["pq_m"])
        if d % m:
            raise ValueError(f"index.pq_m={m} must divide the embedding dim {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, int(cfg["pq_nbits"]), faiss.METRIC_INNER_PRODUCT)
    n_train = min(n, max(int(cfg["train_size"]), 39 * nlist))
    rng = np.random.default_rng(seed)
    train = xb if n_train == n else xb[np.sort(rng.choice(n, n_train, replace=False))]
    if use_gpu:  # train on one GPU (fast k-means), then shard the trained index over all GPUs
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        gpu_index.train(train)
        index = _to_gpus(faiss.index_gpu_to_cpu(gpu_index))
    else:
        index.train(train)
    index.add(xb)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(cfg["nprobe"]))
    return index


def search(
    index: faiss.Index, xq: np.ndarray, k: int, chunk: int = 16384, progress: bool = False, desc: str = "search"
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each query: (similarities [Nq, k] float32, ids [Nq, k] int64; -1 = none)."""
    nq = xq.shape[0]
    k = min(k, index.ntotal)
    sims = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    starts = range(0, nq, chunk)
    for s in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, unit="chunk"):
        q = np.ascontiguousarray(xq[s : s + chunk], dtype=np.float32)
        sims[s : s + chunk], ids[s : s + chunk] = index.search(q, k)
    return sims, ids


def kmeans(
    x: np.ndarray, k: int, niter: int = 20, seed: int = 0, gpu: Any = "auto", max_points_per_centroid: int = 256
) -> np.ndarray:
    """Spherical k-means centroids [k, D] (unit norm, to match cosine similarity) through faiss."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k} for {x.shape[0]} points")
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpu_enabled(gpu),
        max_points_per_centroid=max_points_per_centroid, verbose=False,
    )
    km.train(x)
    return km.centroids.astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (ids [N] int64, cosine [N] float32)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = search(index, x, 1, chunk)
    return ids[:, 0], sims[:, 0]
