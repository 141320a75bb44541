"""Few-label table for BENCHMARKS.md: each model at 1 %, 10 % and 100 % of the train labels and at 1, 5
and 10 shots per class, with kNN (k=20), the linear probe and logistic regression.

  python benchmarks/fewlabel.py --models pixels random runs/fmnist_cpu/teacher_backbone.pth

Every cell runs the real command (`dinolike eval PROTOCOL --train-fraction F | --shots N --label-seeds S`)
on the full Fashion-MNIST sets (60k / 10k) and prints `mean ± sd` over the seeded splits (the 100 % column
is one run). Features are extracted once per model (on-disk cache); results land in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dinolike.commands.eval import main as eval_main  # noqa: E402

SPLITS = {"1%": ["--train-fraction", "0.01"], "10%": ["--train-fraction", "0.1"], "100%": [],
          "1-shot": ["--shots", "1"], "5-shot": ["--shots", "5"], "10-shot": ["--shots", "10"]}
RANDOM_ARGS = ["--config", "configs/fmnist_cpu.yaml"]  # the default recipe's ViT, untrained


def cell(model: str, protocol: str, split: str, args: argparse.Namespace) -> str:
    """One table cell: `mean ± sd` (or the single value of a 100 % run) of the protocol's top-1 %."""
    name = model if model in ("pixels", "random") else Path(model).parent.name or Path(model).stem
    out = Path(args.out) / name / f"{protocol}_{split.replace('%', 'pct')}"
    flags = SPLITS[split] + (["--label-seeds", str(args.seeds)] if SPLITS[split] else [])
    argv = [protocol, "--pretrained", model, *(RANDOM_ARGS if model == "random" else []), *flags,
            "--output-dir", str(out), "--cache-dir", args.cache_dir, "--no-progress", "eval.knn.ks=[20]"]
    if eval_main(argv) != 0:
        return "failed"
    m = json.loads((out / "results.json").read_text())["metrics"]
    key = "k20_top1" if protocol == "knn" else "test_top1"
    return f"{m[key]:.2f} ± {m[key + '_sd']:.2f}" if f"{key}_sd" in m else f"{m[key]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["pixels", "random"])
    p.add_argument("--protocols", nargs="+", default=["knn", "linear", "logreg"])
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--seeds", type=int, default=3, help="seeded splits per few-label cell")
    p.add_argument("--out", default="outputs/bench_fewlabel")
    p.add_argument("--cache-dir", default="outputs/bench_fewlabel/feature_cache")
    args = p.parse_args()
    lines = [f"| model | protocol | {' | '.join(args.splits)} | wall s |",
             "|---|---|" + "---|" * len(args.splits) + "---|"]
    for model in args.models:
        for protocol in args.protocols:
            t = time.perf_counter()
            cells = [cell(model, protocol, split, args) for split in args.splits]
            lines.append(f"| {model} | {protocol} | {' | '.join(cells)} | {time.perf_counter() - t:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
