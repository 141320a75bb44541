"""Dedup + retrieval wall time and peak memory on synthetic clustered embeddings.

    python benchmarks/bench_curation.py --n 100000 300000 1000000 [--dim 256] [--threads 0]

Each size runs in its own subprocess so its peak RSS is its own. The data: `N / 100` cluster centres on
the unit sphere, points = centre + noise (within-cluster cosine ~0.5, so clusters are real but not copies),
plus 5 % injected near-copies of random points (cosine ~0.95) that dedup must merge. Retrieval: 10 000
seeds drawn near 50 of the centres, sample-based (k = 4) and cluster-based (1 000 k-means clusters).
Everything runs with the schema's defaults (configs/curation/base.yaml): dedup is the inverted-list
self-join (N / 256 lists, nprobe 16), retrieval an IVF index sized for its 10 000 queries. Run it under
`nice -n 19` on a shared machine; `--threads 1` avoids OpenMP spin-waiting when other jobs hold the cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(pool [n, dim], seeds [10000, dim], number of injected copies), all rows unit norm."""
    rng = np.random.default_rng(seed)
    n_copies = n // 20
    n_base = n - n_copies
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    step = 100_000
    for s in range(0, n_base, step):  # chunks keep the temporaries small
        m = min(step, n_base - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        x[s : s + m] = centres[rng.integers(0, len(centres), m)] + noise
    x[:n_base] /= np.linalg.norm(x[:n_base], axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_copies)
    x[n_base:] = x[src] + 0.3 * rng.standard_normal((n_copies, dim), dtype=np.float32) / np.sqrt(dim)
    x[n_base:] /= np.linalg.norm(x[n_base:], axis=1, keepdims=True)
    picked = centres[rng.integers(0, min(50, len(centres)), 10_000)]
    seeds = picked + rng.standard_normal(picked.shape, dtype=np.float32) / np.sqrt(dim)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    return x, seeds.astype(np.float32), n_copies


def run_one(n: int, dim: int, threads: int) -> dict:
    from dinolike.curation.config import load_config
    from dinolike.curation.dedup import deduplicate
    from dinolike.curation.index import set_threads
    from dinolike.curation.retrieve import cluster_based, sample_based

    cfg = load_config(None, [f"index.threads={threads}", "retrieve.n_clusters=1000"])
    set_threads(threads)
    t0 = time.perf_counter()
    pool, seeds, n_copies = synthetic(n, dim)
    t1 = time.perf_counter()
    res = deduplicate(pool, None, cfg.dedup, cfg.index)
    t2 = time.perf_counter()
    kept = pool[res.keep]
    got = sample_based(kept, seeds, int(cfg.retrieve.k), -1.0, cfg.index)
    t3 = time.perf_counter()
    cl, stats = cluster_based(kept, seeds, int(cfg.retrieve.n_clusters), int(cfg.retrieve.min_seeds),
                              int(cfg.retrieve.per_cluster), int(cfg.retrieve.kmeans_iters),
                              train_per_cluster=int(cfg.retrieve.kmeans_train_per_cluster))
    t4 = time.perf_counter()
    merged = int((res.component[n - n_copies :] != np.arange(n - n_copies, n)).sum())
    return {
        "n": n, "data_s": t1 - t0, "dedup_s": t2 - t1, "sample_s": t3 - t2, "cluster_s": t4 - t3,
        "total_s": t4 - t1, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "copies_merged": merged / n_copies, "kept": int(res.keep.sum()), "retrieved": len(got.ids) + len(cl.ids),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 300_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all cores)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: run one size, print JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.dim, a.threads)))
        return
    rows = []
    for n in a.n:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--dim", str(a.dim), "--threads",
                              str(a.threads)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"n={n} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done n={n}: {rows[-1]['total_s']:.1f} s", file=sys.stderr)
    print(f"dim {a.dim}, faiss/BLAS threads {a.threads or 'all'}; times exclude making the synthetic data\n")
    print("| N | dedup s | sample-based s | cluster-based s | total s | s per 100k | time x vs previous N "
          "(growth exponent) | peak RSS GB | copies merged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        growth = "-"
        if i:
            prev = rows[i - 1]
            ratio = r["total_s"] / prev["total_s"]
            growth = f"{ratio:.2f} for N x {r['n'] / prev['n']:.2f} ({np.log(ratio) / np.log(r['n'] / prev['n']):.2f})"
        print(f"| {r['n']:,} | {r['dedup_s']:.1f} | {r['sample_s']:.1f} | {r['cluster_s']:.1f} | {r['total_s']:.1f} | "
              f"{r['total_s'] / r['n'] * 1e5:.1f} | {growth} | {r['peak_rss_gb']:.2f} | {r['copies_merged']:.4f} |")


if __name__ == "__main__":
    main()
