"""Training-step overhead of the CPU recipes, as a BENCHMARKS.md table (GitHub issue 8, CPU part).

  nice -n 19 python benchmarks/bench_step.py                      # default rows, synthetic batches
  nice -n 19 python benchmarks/bench_step.py --threads 1 --iters 6
  nice -n 19 python benchmarks/bench_step.py --compile            # adds rows with run.compile=true

Each row is one `dinolike bench --synthetic` run in a fresh process (so one row's compiled code, thread
pool or allocator state cannot leak into the next). The target: overhead_ratio = full SSL step (targets,
heads, losses, backward, clip, AdamW, EMA; no data loading) / (student backbone forward + backward and
teacher backbone forward on the same batch) at most 1.3. The ratio is taken from the fastest of the
alternating iterations of each, which holds up on a machine shared with other jobs (see dinolike/bench.py);
absolute img/s on a shared machine is not comparable between runs. GPU rows: not measured here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dinolike.bench import MARKDOWN_HEADER, markdown_row  # noqa: E402

# (row name, config, overrides): the default recipe and two costlier variants of it
ROWS = [
    ("fmnist_cpu (pico, patch 7, b64)", "configs/fmnist_cpu.yaml", ["data.batch_size=64"]),
    ("fmnist_cpu, patch 4", "configs/fmnist_cpu.yaml",
     ["data.batch_size=64", "model.patch_size=4", "crops.local_size=12"]),
    ("fmnist_cpu, vit_nano, b128", "configs/fmnist_cpu.yaml", ["model.arch=vit_nano", "data.batch_size=128"]),
]


def run_row(config: str, overrides: list[str], iters: int, warmup: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        cmd = [sys.executable, "-m", "dinolike.cli", "bench", "--config", config, "--synthetic",
               "--iters", str(iters), "--warmup", str(warmup), "--json", str(out)]
        cmd += (["--threads", str(threads)] if threads else []) + overrides
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch intra-op threads for every row")
    p.add_argument("--compile", action="store_true", help="also run each row with run.compile=true")
    p.add_argument("--only", help="run only the rows whose name contains this")
    args = p.parse_args(argv)
    rows = [r for r in ROWS if args.only is None or args.only in r[0]]
    if args.compile:
        rows += [(f"{n} compiled", c, [*o, "run.compile=true"]) for n, c, o in rows]
    lines = [MARKDOWN_HEADER]
    for name, config, overrides in rows:
        res = run_row(config, overrides, args.iters, args.warmup, args.threads)
        lines.append(markdown_row(name, res))
        print(lines[-1], file=sys.stderr, flush=True)  # progress: each row as soon as it is measured
    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    print(f"\nCPU, synthetic batches, {threads}, {args.iters} iterations after {args.warmup} warmup; "
          "target: overhead ratio <= 1.3\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
