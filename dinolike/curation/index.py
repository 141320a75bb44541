"""faiss nearest-neighbour search and k-means, sized so that cost grows linearly with the pool.

Exact (flat inner product) search while database x queries is small; IVF-Flat or IVF-PQ beyond. The IVF
sizes come from a cost model rather than a fixed count, because a fixed (or sqrt(N)) number of lists makes
every query scan a growing slice of the database:
- a search with nq queries over nb vectors costs nb * nlist (assigning the database to lists) plus
  nq * nprobe * nb / nlist (scanning); nlist = min(nb / list_size, 4 * sqrt(nq * nprobe)) keeps both terms
  linear in nb for a fixed query set (retrieval) and makes each query scan ~nprobe * list_size vectors for a
  self-search (dedup), whatever nb;
- the coarse quantizer is trained on train_per_list * nlist sampled vectors by two-level k-means
  (sqrt(nlist) groups, then each group split), so training grows linearly with nlist instead of as nlist^2;
- the quantizer is flat (a BLAS matrix product, exact) up to 262,144 lists and HNSW above. Measured
  (benchmarks/bench_quantizer.py, BENCHMARKS 3b): on the synthetic pool, HNSW (efSearch 128) is slower
  than flat at 39k lists and, at every size measured (39k-195k lists), puts 25-65 % of the vectors in
  a list that is not their nearest; flat costs ~7 ns per list and vector at D = 384, linear in nlist.
On faiss-gpu with CUDA the index is sharded over all GPUs. Queries go in chunks so the [chunk, k] result
buffers bound memory whatever the pool size. All vectors are L2-normalised: inner product = cosine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

__all__ = [
    "set_threads", "gpu_enabled", "index_kind", "ivf_nlist", "train_centroids", "make_quantizer", "build_index",
    "iter_search", "search", "kmeans", "assign", "HNSW_ABOVE",
]

HNSW_ABOVE = 262144  # `index.quantizer: auto`: flat (exact, BLAS) up to here, HNSW (approximate graph) above
_blas_limit: Any = None  # threadpoolctl limiter kept alive for the whole process


def set_threads(n: int) -> None:
    """faiss OpenMP threads and BLAS threads (numpy, used by the dedup self-join) for this process; 0 keeps
    the libraries' defaults (all cores). On a busy shared machine 1 is often faster: OpenMP threads spin-wait."""
    global _blas_limit
    if n <= 0:
        return
    faiss.omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover - numpy keeps its own thread count
        return
    _blas_limit = threadpool_limits(limits=n, user_api="blas")


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


def index_kind(nb: int, nq: int, cfg: Mapping[str, Any]) -> str:
    """flat | ivf | ivfpq for a search of nq queries over nb vectors (`auto`: exact while nb * nq is small)."""
    kind = cfg["type"]
    if kind == "auto":
        return "flat" if nb * nq <= float(cfg["flat_max_pairs"]) else "ivf"
    if kind not in ("flat", "ivf", "ivfpq"):
        raise ValueError(f"index.type must be auto, flat, ivf or ivfpq, got {kind!r}")
    return kind


def ivf_nlist(nb: int, nq: int, cfg: Mapping[str, Any], what: str = "database") -> int:
    """IVF list count: `index.nlist`, or (0) min(nb / list_size, 4 sqrt(nq * nprobe)), at least 1."""
    nlist = int(cfg["nlist"])
    if nlist == 0:
        by_size = nb // max(1, int(cfg["list_size"]))
        by_queries = math.ceil(4 * math.sqrt(nq * int(cfg["nprobe"])))
        nlist = max(1, min(by_size, by_queries))
    if nlist > nb:
        raise ValueError(f"index.nlist={nlist} is larger than the {what} ({nb} vectors); lower it or use flat")
    return nlist


def _split_counts(total: int, sizes: np.ndarray) -> np.ndarray:
    """`total` split over groups in proportion to `sizes` [G], each share in [1, size] (needs G <= total <=
    sizes.sum()); rounding is settled on the groups whose share lost (or gained) most."""
    share = total * sizes / sizes.sum()  # [G]
    out = np.clip(np.floor(share).astype(np.int64), 1, sizes)
    while (diff := total - int(out.sum())) != 0:
        if diff > 0:  # give one more to the most under-served groups that have room
            room = np.flatnonzero(out < sizes)
            pick = room[np.argsort(out[room] - share[room], kind="stable")[:diff]]
            out[pick] += 1
        else:  # take one back from the most over-served groups that keep at least one
            spare = np.flatnonzero(out > 1)
            pick = spare[np.argsort(share[spare] - out[spare], kind="stable")[:-diff]]
            out[pick] -= 1
        if len(pick) == 0:
            break
    return out


def train_centroids(
    sample: np.ndarray, nlist: int, niter: int = 10, seed: int = 0, gpu: Any = "auto"
) -> np.ndarray:
    """nlist unit centroids [nlist, D] of `sample` by two-level spherical k-means.

    Flat k-means costs n_train * nlist per iteration, i.e. nlist^2 with n_train ~ nlist; two levels
    (sqrt(nlist) groups, then each group into its share of the lists) cost n_train * 2 sqrt(nlist).
    """
    n = len(sample)
    if not 1 <= nlist <= n:
        raise ValueError(f"cannot train {nlist} lists on {n} vectors")
    n_top = int(math.sqrt(nlist))
    if n_top < 8:  # small: one level is as cheap
        return kmeans(sample, nlist, niter, seed, gpu, max_points_per_centroid=n)
    top = kmeans(sample, n_top, niter, seed, gpu, max_points_per_centroid=n)
    group, _ = assign(sample, top)  # [n]
    sizes = np.bincount(group, minlength=n_top)
    used = np.flatnonzero(sizes)
    counts = _split_counts(nlist, sizes[used])
    order = np.argsort(group, kind="stable")
    members = np.split(order, np.cumsum(sizes)[:-1])
    parts = [kmeans(sample[members[g]], int(c), niter, seed + 1 + i, gpu, max_points_per_centroid=n)
             for i, (g, c) in enumerate(zip(used, counts, strict=True))]
    out = np.concatenate(parts)  # [nlist, D]
    if len(out) != nlist:  # cannot happen for n >= nlist >= n_top; a wrong count would corrupt the lists
        raise RuntimeError(f"two-level k-means made {len(out)} centroids instead of {nlist}")
    return np.ascontiguousarray(out, dtype=np.float32)


def make_quantizer(centroids: np.ndarray, cfg: Mapping[str, Any]) -> faiss.Index:
    """Index over the list centroids: flat (exact, BLAS) or HNSW (`index.quantizer`, auto by list count)."""
    nlist, d = centroids.shape
    kind = cfg["quantizer"]
    if kind == "auto":
        kind = "hnsw" if nlist > HNSW_ABOVE else "flat"
    if kind == "flat":
        q: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        q = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        q.hnsw.efConstruction = 80
        q.hnsw.efSearch = max(128, 4 * int(cfg["nprobe"]))  # list recall depends on the data: measure it first
    else:
        raise ValueError(f"index.quantizer must be auto, flat or hnsw, got {kind!r}")
    q.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return q


def _train_sample(xb: np.ndarray, nlist: int, cfg: Mapping[str, Any], seed: int) -> np.ndarray:
    n = len(xb)
    n_train = min(n, max(nlist, int(cfg["train_per_list"]) * nlist))
    if n_train == n:
        return xb
    rng = np.random.default_rng(seed)
    return xb[np.sort(rng.choice(n, n_train, replace=False))]


def build_index(
    xb: np.ndarray, cfg: Mapping[str, Any], seed: int = 0, what: str = "database", n_queries: int | None = None
) -> faiss.Index:
    """An inner-product index over `xb` [N, D] float32 for `n_queries` queries (None: N, a self-search), of
    the kind and size chosen by `cfg` (the index section)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    nq = n if n_queries is None else int(n_queries)
    kind = index_kind(n, nq, cfg)
    use_gpu = gpu_enabled(cfg["gpu"])
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
        if use_gpu:
            index = _to_gpus(index)
        index.add(xb)
        return index
    nlist = ivf_nlist(n, nq, cfg, what)
    train = _train_sample(xb, nlist, cfg, seed)
    quantizer = make_quantizer(train_centroids(train, nlist, int(cfg["train_iters"]), seed, cfg["gpu"]), cfg)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m = int(cfg["pq_m"])
        if d % m:
            raise ValueError(f"index.pq_m={m} must divide the embedding dim {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, int(cfg["pq_nbits"]), faiss.METRIC_INNER_PRODUCT)
    index.train(train)  # the quantizer already holds nlist centroids: faiss trains only the PQ codebooks
    if use_gpu:
        index = _to_gpus(index)
    index.add(xb)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(cfg["nprobe"]))
    return index


def iter_search(
    index: faiss.Index, xq: np.ndarray, k: int, chunk: int = 16384, progress: bool = False, desc: str = "search"
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first query row, similarities [c, k], ids [c, k]) per chunk of queries, so a caller can reduce each
    chunk (threshold, top-1) without ever holding the [Nq, k] result."""
    k = min(k, index.ntotal)
    starts = range(0, xq.shape[0], chunk)
    for s in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, unit="chunk"):
        q = np.ascontiguousarray(xq[s : s + chunk], dtype=np.float32)
        sims, ids = index.search(q, k)
        yield s, sims, ids


def search(
    index: faiss.Index, xq: np.ndarray, k: int, chunk: int = 16384, progress: bool = False, desc: str = "search"
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each query: (similarities [Nq, k] float32, ids [Nq, k] int64; -1 = none)."""
    nq, k = xq.shape[0], min(k, index.ntotal)
    sims = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    for s, sim, idx in iter_search(index, xq, k, chunk, progress, desc):
        sims[s : s + len(sim)], ids[s : s + len(idx)] = sim, idx
    return sims, ids


def kmeans(
    x: np.ndarray, k: int, niter: int = 20, seed: int = 0, gpu: Any = "auto", max_points_per_centroid: int = 256
) -> np.ndarray:
    """Spherical k-means centroids [k, D] (unit norm, to match cosine similarity) through faiss.

    faiss trains on a random subsample of at most k * max_points_per_centroid rows: the cost is then
    independent of len(x); assign every row afterwards with `assign`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k} for {x.shape[0]} points")
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpu_enabled(gpu),
        max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1, verbose=False,
    )
    km.train(x)
    return km.centroids.astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (ids [N] int64, cosine [N] float32)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = search(index, x, 1, chunk)
    return ids[:, 0], sims[:, 0]
