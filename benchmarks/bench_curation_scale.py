"""Curation out of core: wall time and peak RSS per step on synthetic pools of 1M-10M+ embeddings.

    python benchmarks/bench_curation_scale.py flow --n 10000000 --dim 384 --work /work/bench44/w10m
    python benchmarks/bench_curation_scale.py quality --n 1000000 --dim 384 --work /work/bench44/w1m
    python benchmarks/bench_curation_scale.py crossover --sizes 20000 50000 100000 --dim 384 --work /work/bench44/x

flow: the pool (clustered unit vectors, 5 % injected near-copies; curation/synth.py) and 10k seeds are
written in the work dir's shard format, then `dedup`, `retrieve` and `sample` run as the library steps
(`run_step`), each in its own process so that its peak RSS is its own. The work dir is kept between runs:
data and finished steps are reused (delete it to start over).
`--steps data keepall sample` times `sample` alone on a pool too large to dedup here: `keepall` writes a
stand-in dedup result that keeps every image (its output says so).
quality: after `dedup` on the pool, `--queries` random images are searched exactly (the whole pool streamed
past them): precision and recall of the dedup edges at those images against exact search, and how many of
the injected copies were merged / how many other images were removed.
crossover: exact (flat) vs IVF-PQ self-dedup wall time at a few pool sizes: where `index.flat_max_pairs` sits.
Each line printed is one JSON record; `lscpu` model name first. Run under `nice -n 19` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"work_dir={args.work}", f"pool=[folder-nolabels:{args.work}/synthetic]",
            f"seeds=[folder:{args.work}/synthetic-seeds]", "references=[]", "embed.progress=false",
            f"index.threads={args.threads}", f"sample.levels=[{args.levels}]",
            f"sample.kmeans_iters={args.kmeans_iters}", f"sample.resample_steps=[{args.resample}]",
            f"sample.sample_size=[{','.join(['10'] * len(args.levels.split(',')))}]",
            f"sample.target={args.target}", f"retrieve.n_clusters={args.retrieve_clusters}",
            f"retrieve.kmeans_iters={args.kmeans_iters}", *args.set]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args: argparse.Namespace) -> None:
    """One step in this process; prints {step, seconds, peak_rss_gb, summary}."""
    import logging

    from dinolike.curation.config import load_config
    from dinolike.curation.index import set_threads
    from dinolike.curation.steps import run_step
    from dinolike.curation.synth import write_synthetic_set

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    if args.child == "data":
        emb = Path(args.work) / "embeddings"
        copies = write_synthetic_set(emb / "pool", args.n, args.dim, args.shard_size, 0.05, 0)
        np.save(Path(args.work) / "copies.npy", copies)
        write_synthetic_set(emb / "seeds", 10_000, args.dim, 10_000, 0.0, 0, centres_of=args.n, use_centres=50)
        summary: dict = {"rows": args.n, "copies": len(copies)}
    elif args.child == "keepall":  # a stand-in dedup result (every image kept) to time the later steps alone
        from dinolike.curation.dedup_step import dedup_fingerprint
        from dinolike.curation.store import save_npz, write_json

        cfg = load_config(None, overrides(args))
        n, out = args.n, Path(args.work) / "dedup"
        save_npz(out / "result.npz", keep=np.ones(n, bool), component=np.arange(n), leak=np.zeros(n, bool),
                 ref_sim=np.full(n, -np.inf, np.float32), ref_id=np.full(n, -1), n_edges=np.int64(0))
        summary = {"stand_in": "dedup not run: every image kept"}
        write_json(out / "done.json", {"fingerprint": dedup_fingerprint(cfg), "summary": summary})
    else:
        cfg = load_config(None, overrides(args))
        set_threads(args.threads)
        summary = run_step(cfg, args.child)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step": args.child, "n": args.n, "seconds": round(time.perf_counter() - t0, 1),
                      "cpu_seconds": round(use.ru_utime + use.ru_stime, 1),  # what shared cores do not blur
                      "peak_rss_gb": round(peak_rss_gb(), 2), "summary": summary}, default=str), flush=True)


def run_child(args: argparse.Namespace, step: str) -> dict:
    cmd = [sys.executable, __file__, "--child", step, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    print(line, flush=True)
    return json.loads(line)


def quality(args: argparse.Namespace) -> None:
    """Precision / recall of the dedup edges at random images, against exact search over the whole pool."""
    from dinolike.curation.config import load_config
    from dinolike.curation.dedup_step import load_dedup
    from dinolike.curation.embed_step import shard_set
    from dinolike.curation.rows import open_view
    from dinolike.curation.search import exact_knn
    from dinolike.curation.workdir import done, work_dir

    cfg = load_config(None, overrides(args))
    view = open_view(shard_set(cfg, "pool"))
    thr, k = float(cfg.dedup.threshold), int(cfg.dedup.k)
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(len(view), args.queries, replace=False))
    t0 = time.perf_counter()
    sims, ids = exact_knn(view, view.take(q), k + 1, 8192)  # [Q, k+1]; blocks of 8192 rows: Q x 8192 floats
    t_exact = time.perf_counter() - t0
    ref = {(int(a), int(b)) for a, row_s, row_i in zip(q, sims, ids, strict=True)
           for b, s in zip(row_i, row_s, strict=True) if s > thr and b != a}
    ref = {(min(a, b), max(a, b)) for a, b in ref}
    fp = done(cfg, "dedup")["fingerprint"]
    qs = set(q.tolist())
    got = set()
    for f in sorted((work_dir(cfg, "dedup", fp) / "parts").glob("part_*.npz")):
        with np.load(f) as z:
            src, dst = z["src"], z["dst"]
        m = np.isin(src, q) | np.isin(dst, q)
        got |= {(int(a), int(b)) for a, b in zip(src[m], dst[m], strict=True) if a in qs or b in qs}
    # an approximate edge found from the other end (b's neighbours) is still a true pair when its cosine > thr;
    # the exact reference holds the pairs within q's own k nearest: count the others as true when above thr
    extra = got - ref
    if extra:
        e = np.array(sorted(extra))
        cos = np.einsum("ij,ij->i", view.take(e[:, 0]), view.take(e[:, 1]))
        ref |= {tuple(p) for p, c in zip(e.tolist(), cos, strict=True) if c > thr}
    hit = len(got & ref)
    res = load_dedup(cfg)
    copies = np.load(Path(args.work) / "copies.npy")
    in_pair = np.zeros(len(view), bool)
    in_pair[copies.ravel()] = True
    merged = (res.component[copies[:, 0]] == res.component[copies[:, 1]]).mean()
    print(json.dumps({"quality": "dedup edges at random images vs exact search", "n": len(view),
                      "queries": len(q), "exact_seconds": round(t_exact, 1), "exact_pairs": len(ref),
                      "found_pairs": len(got), "precision": round(hit / max(1, len(got)), 4),
                      "recall": round(hit / max(1, len(ref)), 4), "injected_copies_merged": round(float(merged), 4),
                      "removed_not_injected": int((~res.keep & ~in_pair).sum()),
                      "summary": done(cfg, "dedup")["summary"]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["flow", "quality", "crossover"], default="flow")
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--work", default="/work/bench44/w10m")
    p.add_argument("--shard-size", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--levels", default="1000,100,10", help="sample.levels, comma-separated")
    p.add_argument("--resample", default="0,2,2", help="sample.resample_steps, comma-separated")
    p.add_argument("--kmeans-iters", type=int, default=5)
    p.add_argument("--target", type=int, default=100_000)
    p.add_argument("--retrieve-clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    p.add_argument("--steps", nargs="+", default=["data", "dedup", "retrieve", "sample"])
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    print(json.dumps({"cpu": cpu_name(), "argv": sys.argv[1:]}), flush=True)
    if args.what == "crossover":
        base = args.work
        for n in args.sizes:
            for kind in ("flat", "ivfpq"):
                args.work, args.n = f"{base}/{n}-{kind}", n
                sys.argv = [sys.argv[0], "--n", str(n), "--dim", str(args.dim), "--work", args.work,
                            "--threads", str(args.threads), "--set", f"index.type={kind}", *args.set]
                run_child(args, "data")
                run_child(args, "dedup")
        return
    for step in args.steps:
        run_child(args, step)
    if args.what == "quality":
        quality(args)


if __name__ == "__main__":
    main()
