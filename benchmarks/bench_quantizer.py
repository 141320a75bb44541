"""Coarse quantizer of the IVF index: flat (BLAS) against HNSW, cost per vector and list recall, by list count.

Every vector added to the dedup index and every query asks the quantizer for its nearest lists (1 to add,
`index.nprobe` to search), so at 10M-1B images this assignment is a large share of the dedup step. The
`index.quantizer: auto` switch from flat to HNSW is set from this measurement.

Pool: the benchmarks' synthetic pool of N = nlist * 256 rows (`dinolike.curation.synth`: min(N / 100, 100k)
centres, within-cluster cosine ~0.5). `--centroids trained` (default): the list centroids are trained as the
dedup index trains them (`train_centroids`, two-level k-means) on nlist * `--per-list` rows of that pool;
`mix`: each centroid the normalised sum of 3 random centres (no training; a harder case for a graph).
Queries: fresh rows of the pool. Single-threaded (faiss and BLAS).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_quantizer.py --nlist 39062 97656 195312
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import time

import faiss
import numpy as np

from dinolike.curation.index import train_centroids
from dinolike.curation.synth import synthetic_shard


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return (name or [platform.processor()])[0]


def _timed(fn, n: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    _, ids = fn()
    return (time.perf_counter() - t) / n * 1e3, ids  # ms per vector


def run(nlist: int, dim: int, queries: int, nprobe: int, efs: list[int], seed: int, how: str, per_list: int) -> None:
    rng = np.random.default_rng(seed)
    n_centres = max(1, min(nlist * 256 // 100, 100_000))
    centres = _unit(rng.standard_normal((n_centres, dim), dtype=np.float32))  # [C, D]
    xq = synthetic_shard(0, queries, centres, 0.0, seed, 0)[0]  # [Q, D]
    t = time.perf_counter()
    if how == "trained":
        sample = synthetic_shard(1, nlist * per_list, centres, 0.0, seed, queries)[0]  # [nlist * per_list, D]
        cents = train_centroids(sample, nlist, 10, seed, gpu=False)
        del sample
    else:
        pick = rng.integers(0, n_centres, (nlist, 3))
        cents = _unit(centres[pick].sum(1) + rng.standard_normal((nlist, dim), dtype=np.float32) / np.sqrt(dim))
    print(f"nlist {nlist:>7}: {how} centroids in {time.perf_counter() - t:.0f} s", flush=True)
    flat = faiss.IndexFlatIP(dim)
    flat.add(cents)
    t1, ref1 = _timed(lambda: flat.search(xq, 1), queries)
    tp, refp = _timed(lambda: flat.search(xq, nprobe), queries)
    print(f"nlist {nlist:>7}: flat    k=1 {t1:6.3f} ms  k={nprobe} {tp:6.3f} ms (exact)", flush=True)
    t = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(cents)
    build = time.perf_counter() - t
    for ef in efs:
        hnsw.hnsw.efSearch = ef
        h1, a1 = _timed(lambda: hnsw.search(xq, 1), queries)
        hp, ap = _timed(lambda: hnsw.search(xq, nprobe), queries)
        top1 = float((a1[:, 0] == ref1[:, 0]).mean())
        recall = float(np.mean([len(set(a) & set(b)) for a, b in zip(ap, refp, strict=True)]) / nprobe)
        print(f"nlist {nlist:>7}: hnsw ef={ef:<4} k=1 {h1:6.3f} ms (top-1 {top1:.3f})  k={nprobe} {hp:6.3f} ms "
              f"(recall@{nprobe} {recall:.3f})  build {build:.0f} s", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nlist", type=int, nargs="+", default=[39062, 97656, 195312])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ef", type=int, nargs="+", default=[128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--centroids", choices=["trained", "mix"], default="trained")
    p.add_argument("--per-list", type=int, default=16, help="trained: sample rows per list")
    a = p.parse_args()
    faiss.omp_set_num_threads(1)
    print(f"CPU: {_cpu()}; faiss {faiss.__version__}; D = {a.dim}, {a.queries} queries, 1 thread, "
          f"{a.centroids} centroids", flush=True)
    for nlist in a.nlist:
        run(nlist, a.dim, a.queries, a.nprobe, a.ef, a.seed, a.centroids, a.per_list)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
