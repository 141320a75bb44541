"""Eval-suite benchmarks: protocol speed on synthetic features, and the Fashion-MNIST baseline table.

  python benchmarks/bench_eval.py speed                   # kNN 60k x 10k (D=384), linear grid, logreg
  python benchmarks/bench_eval.py fmnist --models pixels random [CKPT ...] [--protocols knn linear logreg]

`fmnist` runs the eval jobs `dinolike eval` runs (`dinolike.eval.protocols.eval_knn / eval_linear /
eval_logreg`, called in this process) on the full 60k/10k sets and prints one
markdown table (accuracy + wall time per eval) for BENCHMARKS.md; results land in --out/<model>/<protocol>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dinolike.eval.features import FeatureSet  # noqa: E402
from dinolike.eval.knn import knn_eval  # noqa: E402
from dinolike.eval.linear import linear_probe  # noqa: E402
from dinolike.eval.logreg import logreg_eval  # noqa: E402
from dinolike.eval.settings import eval_settings  # noqa: E402

# the random ViT baseline: the default recipe's architecture and initialisation, untrained
RANDOM_CONFIG = "configs/fmnist_cpu.yaml"


def _clustered(n: int, dim: int, n_classes: int, seed: int, n_blocks: int = 1) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, n_classes, (n,), generator=g)
    cls = centers[labels].unsqueeze(1) + 5.0 * torch.randn(n, n_blocks, dim, generator=g)  # [N, L, D]
    return FeatureSet(cls, cls[:, -1] + torch.randn(n, dim, generator=g), labels)


def speed(args: argparse.Namespace) -> None:
    d = args.dim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    train, test = _clustered(args.n_train, d, 10, 1, n_blocks=4), _clustered(args.n_test, d, 10, 2, n_blocks=4)
    for rep in range(args.repeats):
        t = time.perf_counter()
        res = knn_eval(train.knn_features(), train.labels, test.knn_features(), test.labels, eval_settings("knn"))
        print(
            f"knn {args.n_train}x{args.n_test} D={d} ks=10,20,100,200: {time.perf_counter() - t:.2f} s "
            f"(run {rep}, k20 top1 {res['k20_top1']:.2f})"
        )
    t = time.perf_counter()
    res = linear_probe(train, test, eval_settings("linear", lrs=[1e-4, 1e-3, 1e-2, 0.1], epochs=args.linear_epochs),
                       seed=0, device="cpu")
    print(
        f"linear probe 4 lrs x 4 kinds, {args.linear_epochs} epochs over {args.n_train}: "
        f"{time.perf_counter() - t:.2f} s (test top1 {res['test_top1']:.2f})"
    )
    t = time.perf_counter()
    n = args.logreg_n
    res = logreg_eval(
        train.knn_features()[:n].numpy(),
        train.labels[:n].numpy(),
        test.knn_features().numpy(),
        test.labels.numpy(),
        eval_settings("logreg", cs=[0.01, 0.1, 1.0], backend="sklearn", max_iter=1000),
        seed=0,
    )
    print(f"logreg 3 Cs on {n}x{d}: {time.perf_counter() - t:.2f} s (test top1 {res['test_top1']:.2f})")


def fmnist(args: argparse.Namespace) -> None:
    from dinolike.errors import DinolikeError
    from dinolike.eval.config import job_config
    from dinolike.eval.protocols import eval_knn, eval_linear, eval_logreg

    jobs = {"knn": eval_knn, "linear": eval_linear, "logreg": eval_logreg}
    rows = []
    for model in args.models:
        name = Path(model).stem if model not in ("pixels", "random") else model
        config = RANDOM_CONFIG if model == "random" else None
        for proto in args.protocols:
            out = Path(args.out) / name / proto
            keys = {"output_dir": str(out), "progress": False, "cache_dir": args.cache_dir,
                    "limit_train": args.limit_train}
            t = time.perf_counter()
            try:
                jobs[proto](job_config(model, config, [], keys))
                rc = 0
            except DinolikeError as e:
                print(f"{name} {proto}: {e}")
                rc = 1
            wall = time.perf_counter() - t
            if rc != 0:
                rows.append(f"| {name} | {proto} | failed (rc {rc}) | | |")
                continue
            res = json.loads((out / "results.json").read_text())
            m = res["metrics"]
            acc = m.get("k20_top1", m.get("test_top1"))
            detail = {"knn": "k=20", "linear": m.get("best_head", ""), "logreg": f"C={m.get('best_C')}"}[proto]
            feat_s = sum(v for k, v in res["timings_s"].items() if k.startswith("features"))
            rows.append(
                f"| {name} | {proto} | {acc:.2f} ({detail}) | {res['protocol_seconds']:.1f} | "
                f"{feat_s:.1f} | {wall:.1f} |"
            )
    print("\n| model | protocol | top-1 % | protocol s | features s (cached: ~0) | wall s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--n-train", type=int, default=60000)
    s.add_argument("--n-test", type=int, default=10000)
    s.add_argument("--dim", type=int, default=384)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--linear-epochs", type=int, default=2)
    s.add_argument("--logreg-n", type=int, default=10000)
    f = sub.add_parser("fmnist")
    f.add_argument("--models", nargs="+", default=["pixels", "random"])
    f.add_argument("--protocols", nargs="+", default=["knn", "linear", "logreg"])
    f.add_argument("--out", default="outputs/bench_eval")
    f.add_argument("--cache-dir", default="outputs/bench_eval/feature_cache")
    f.add_argument("--limit-train", type=int, default=None)
    args = p.parse_args()
    {"speed": speed, "fmnist": fmnist}[args.cmd](args)


if __name__ == "__main__":
    main()
