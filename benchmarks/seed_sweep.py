"""Multi-seed robustness check of a recipe: does it learn under every init, or collapse for some?

Runs the recipe for a short schedule (default: one epoch, one process, batch 64, one thread) once per
seed, `--jobs` runs at a time, then a full kNN (k=20, 60k / 10k) of each run's teacher, and prints one
markdown row per seed (DINO loss at chosen iterations, the collapse watch's entropies, kNN) plus the
band over seeds. A run that the collapse detector stopped is reported as such, with its iteration.

    python benchmarks/seed_sweep.py --seeds 0-7 --out /tmp/sweep
    python benchmarks/seed_sweep.py --seeds 0-7 --python /path/to/torch-2.11/venv/bin/python --out /tmp/s211
    python benchmarks/seed_sweep.py --seeds 1 --stop-at 400 --out /tmp/probe optim.base_lr=0.002

`--stop-at N` ends each run at iteration N of the same schedule (for quick probes; no kNN then).
Extra `key=value` arguments are passed to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANDOM_VIT_KNN = 67.84  # BENCHMARKS section 2: a random ViT of the default shape, k=20, 60k / 10k
BASE = [
    "dist.local_processes=1", "data.num_workers=0", "run.progress=false",
    "eval.knn_every=0", "eval.final_knn=false", "run.checkpoint_every=100000",
]


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def run_one(args: argparse.Namespace, seed: int) -> dict:
    out = Path(args.out) / f"seed{seed}"
    cmd = [args.python, "-m", "dinolike.cli", "train", "--config", args.config, *BASE,
           f"optim.epochs={args.epochs}", f"run.seed={seed}", f"run.output_dir={out}", *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.time()
    log = open(out.parent / f"seed{seed}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    stopped_early = False
    while proc.poll() is None:
        time.sleep(2)
        if args.stop_at:
            rows = read_metrics(out)
            if rows and rows[-1]["iteration"] >= args.stop_at:
                proc.terminate()
                proc.wait()
                stopped_early = True
    log.close()
    res: dict = {"seed": seed, "rc": proc.returncode, "train_s": round(time.time() - t0, 1)}
    text = (out.parent / f"seed{seed}.log").read_text()
    res["collapse"] = next((ln.strip() for ln in text.splitlines() if "collapse" in ln.lower()), None)
    rows = read_metrics(out)
    by_it = {r["iteration"]: r for r in rows}
    for it in args.at:
        r = by_it.get(it)
        res[f"loss@{it}"] = None if r is None else r.get("dino_global_loss")
    last = rows[-1] if rows else {}
    res["last_it"] = last.get("iteration")
    for k in ("teacher_entropy", "student_mean_entropy", "koleo_loss"):
        res[k] = last.get(k)
    if stopped_early or proc.returncode != 0 or not (out / "teacher_backbone.pth").exists():
        return res
    knn_dir = out / "eval_knn"
    subprocess.run(
        [args.python, "-m", "eval.knn", "--pretrained", str(out / "teacher_backbone.pth"), "--config",
         str(out / "config.yaml"), "--train-dataset", "fmnist:train", "--val-dataset", "fmnist:test",
         "--output-dir", str(knn_dir)],
        cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    res_file = knn_dir / "results.json"
    if res_file.exists():
        res["knn20"] = json.loads(res_file.read_text())["metrics"]["k20_top1"]
    return res


def fmt(v: float | None, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3,5")
    p.add_argument("--config", default="configs/fmnist_cpu.yaml")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--python", default=sys.executable, help="interpreter (another venv: another torch)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each by default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--at", default="100,300,600,937", help="iterations whose DINO loss is printed")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    args.at = [int(x) for x in args.at.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: run_one(args, s), seeds))
    ver = subprocess.run([args.python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True).stdout.strip()
    print(f"torch {ver}, {args.config}, {args.epochs} epoch(s), overrides: {' '.join(args.overrides) or '-'}")
    head = " / ".join(str(i) for i in args.at)
    print(f"| seed | dino_global_loss at {head} | teacher H / student-mean H / KoLeo at the end | kNN k=20 |")
    print("|---|---|---|---|")
    for r in results:
        losses = " / ".join(fmt(r.get(f"loss@{i}")) for i in args.at)
        ents = " / ".join(fmt(r.get(k), 2) for k in ("teacher_entropy", "student_mean_entropy", "koleo_loss"))
        knn = fmt(r.get("knn20"), 2) if r.get("knn20") is not None else (
            f"collapse detected (rc {r['rc']})" if r.get("collapse") else f"- (rc {r['rc']}, it {r['last_it']})")
        print(f"| {r['seed']} | {losses} | {ents} | {knn} |")
    knns = [r["knn20"] for r in results if r.get("knn20") is not None]
    if knns:
        mean = sum(knns) / len(knns)
        sd = math.sqrt(sum((k - mean) ** 2 for k in knns) / max(len(knns) - 1, 1))
        print(f"\nkNN over {len(knns)} of {len(results)} seeds: min {min(knns):.2f}, max {max(knns):.2f}, "
              f"mean {mean:.2f} +- {sd:.2f} (random ViT: {RANDOM_VIT_KNN})")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    bad = [r for r in results if r.get("collapse") or (r.get("knn20") is not None and r["knn20"] < RANDOM_VIT_KNN)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
