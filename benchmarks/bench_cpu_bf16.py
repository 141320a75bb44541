"""CPU bf16 autocast of the training step, variant by variant, with the ops that make the difference.

  nice -n 19 python benchmarks/bench_cpu_bf16.py                   # main job's step: 1 thread, batch 32
  nice -n 19 python benchmarks/bench_cpu_bf16.py --variants fp32 bf16 --iters 40 model.depth=6

Variants (each in a fresh process, so thread pools and autocast caches cannot leak between them):
- fp32: no autocast (the default, `precision.cpu: fp32`);
- bf16: `precision.cpu: bf16` as shipped (matmuls in bf16, attention in fp32);
- bf16-attn: the same, but attention also in bf16 (torch's bf16 flash-attention CPU kernel);
- bf16-teacher: autocast around the teacher's forward only (it has no backward).
Each times `train_step` (the loop's own step) on one synthetic batch of the recipe, back to back, and
prints the fastest and the median step (the fastest is the least disturbed on shared cores), then a
torch.profiler table of the ops that take the most self time over a few steps. The real 2-process
command's A/B is `benchmarks/train_ab.sh`; this is where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("fp32", "bf16", "bf16-attn", "bf16-teacher")


def measure(variant: str, config: str, overrides: list[str], iters: int, top: int) -> dict:
    """Time and profile one variant in this process (1 thread)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import dinolike.layers.attention as attention
    import dinolike.training.ssl as ssl
    from dinolike import dist
    from dinolike.bench.batches import synthetic_batch
    from dinolike.config import load_config
    from dinolike.training.loop import build_method
    from dinolike.training.optim import build_optimizer
    from dinolike.training.schedules import build_schedules
    from dinolike.training.step import train_step

    torch.set_num_threads(1)
    bf16_step = variant in ("bf16", "bf16-attn")
    precision = "bf16" if bf16_step else "fp32"
    cfg = load_config(config, ["dist.local_processes=1", f"precision.cpu={precision}", *overrides])
    if variant == "bf16-attn":  # what the step ran before attention was kept in fp32
        attention._sdpa = torch.nn.functional.scaled_dot_product_attention
    if variant == "bf16-teacher":
        targets = ssl.teacher_targets

        def teacher_in_bf16(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return targets(*args, **kwargs)

        ssl.teacher_targets = teacher_in_bf16
    env = dist.init_distributed("cpu")
    torch.manual_seed(0)
    method = build_method(cfg)
    method.prepare_distributed(env)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    clip = method.grad_clip_groups()
    b = cfg.data.batch_size
    sched = build_schedules(cfg, b).at(600)  # past the warmup: every parameter group moving
    batch = synthetic_batch(cfg, b, torch.device("cpu"), cfg.run.seed)

    def step() -> None:
        train_step(method, opt, batch, sched, torch.device("cpu"), clip)

    for _ in range(5):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof, contextlib.redirect_stdout(sys.stderr):
        for _ in range(5):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "variant": variant, "batch": b,
        "min_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
        "img_per_s_at_min": b / min(times),
        "ops": [{"name": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 5, "calls_per_step": e.count // 5}
                for e in ops],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist_cpu.yaml")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--iters", type=int, default=20, help="timed steps per variant")
    p.add_argument("--top", type=int, default=8, help="ops listed per variant")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's variant
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.config, args.overrides, args.iters, args.top)))
        return 0
    results = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--one", v, "--config", args.config, "--iters", str(args.iters),
               "--top", str(args.top), *args.overrides]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]["min_ms"]
    print(f"| variant | step ms (fastest / median) | img/s at fastest | vs {results[0]['variant']} |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['min_ms']:.1f} / {r['median_ms']:.1f} | {r['img_per_s_at_min']:.0f} | "
              f"{base / r['min_ms']:.2f}x |")
    for r in results:
        ops = ", ".join(f"{o['name']} {o['self_ms_per_step']:.1f} ms ({o['calls_per_step']} calls)" for o in r["ops"])
        print(f"\n{r['variant']}, self time per step: {ops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
