"""Timing the real training step (`dinolike bench --config FILE [key=value ...]`, dinolike/commands/bench.py).

It runs the loop's own `train_step` (dinolike/training/step.py), so what is timed is what trains, three ways:
- phase by phase, the device synced around each phase: a step-time breakdown (data, teacher forward,
  student forward + losses, backward, optimizer with the gradient clip, EMA), alternating iteration by
  iteration with the "pure" reference (student backbone forward/backward plus teacher backbone forward
  on the same batch, no heads or losses), so the overhead of everything else is one number:
  `overhead_ratio`, the ratio of their fastest iterations (on a machine shared with other jobs, load
  only slows things down, so the fastest of alternating runs is the least disturbed one of each);
- back to back with no sync inside (`img_per_s`): the rate training runs at, the syncs of the breakdown
  cost a GPU its overlap of launches and kernels;
- with real data (no `--synthetic`): the loader alone, the step alone on one on-device batch, and the
  two together, and which of them is the bottleneck.
Also: peak memory, model FLOPs (fvcore for the dense layers, attention counted here), MFU against the
best matmul of several sizes measured on the same device in the same run, and the SDPA kernel that ran.
"""

from __future__ import annotations

import gc
import itertools
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from omegaconf import DictConfig

from dinolike.bench.batches import loader_img_per_s, steps_img_per_s, synthetic_batch
from dinolike.bench.device import (
    PEAK_SIZES,
    attention_kernel_that_ran,
    peak_matmul_flops,
    sdpa_context,
    sync,
    timed,
)
from dinolike.bench.flops import step_flops


def run_bench(cfg: DictConfig, iters: int, warmup: int, synthetic: bool = False, sdpa: str = "auto") -> dict:
    """Time `train_step` (the loop's own step) phase by phase, and the pure-backbone reference beside it;
    then its img/s without per-phase syncs, and with real data the loader alone and the two together."""
    from dinolike import dist
    from dinolike.training.data import build_batch_mover, build_train_loader
    from dinolike.training.loop import build_method
    from dinolike.training.method import untimed
    from dinolike.training.optim import build_optimizer
    from dinolike.training.schedules import build_schedules
    from dinolike.training.ssl import compile_step_modules
    from dinolike.training.step import train_step

    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    env = dist.init_distributed(cfg.run.device)
    dev = env.device
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg).to(dev)
    method.prepare_distributed(env)
    if cfg.run.compile:
        compile_step_modules(method, block_mode=cfg.run.compile_mode)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    clip_groups = method.grad_clip_groups()  # as the loop: distillation clips per student
    sched = build_schedules(cfg, cfg.data.batch_size * env.world_size)
    if synthetic:  # made on the device once; every step gets the same tensors (no host work per step)
        batches: Iterator[dict] = itertools.repeat(synthetic_batch(cfg, cfg.data.batch_size, dev, cfg.run.seed))
    else:
        move = build_batch_mover(cfg, dev)
        loader = build_train_loader(cfg, env, start_position=0)
        batches = (move(b) for b in loader)

    def step(batch: dict, i: int, phase=untimed) -> None:
        train_step(method, opt, batch, sched.at(i), dev, clip_groups, phase=phase)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with sdpa_context(sdpa):
        result = _phase_breakdown(method, step, batches, iters, warmup, dev, cfg)
        batch = result.pop("last_batch")
        # the same on-device batch over and over: the step's own rate, whatever feeds it
        step_rate = steps_img_per_s(lambda b, i: step(b, warmup + iters + i), itertools.repeat(batch), iters, dev)
        result["img_per_s"] = step_rate
        if not synthetic:
            # Each rate from a fresh loader, the previous one's workers ended first: prefetched batches
            # (prefetch_factor x workers) must not pass for throughput, nor idle workers compete for cores.
            del batches, loader
            gc.collect()
            n = max(iters, 2 * cfg.data.num_workers * 4)  # well past what the workers queue ahead
            loader_rate = loader_img_per_s(iter(build_train_loader(cfg, env, start_position=0)), n)
            gc.collect()
            fresh = iter(build_train_loader(cfg, env, start_position=0))
            next(fresh)  # worker start-up is not throughput
            both = steps_img_per_s(lambda b, i: step(b, warmup + 2 * iters + i), (move(b) for b in fresh), n, dev)
            del fresh
            result.update(img_per_s=both, step_img_per_s=step_rate, loader_img_per_s=loader_rate,
                          bottleneck="loader" if loader_rate < step_rate else "step")
        result["attention_kernel"] = _attention_kernel(method, cfg, dev)
    result.update(
        device=str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        arch=cfg.model.arch,
        compiled=bool(cfg.run.compile),
        sdpa=sdpa,
        data="synthetic (on the device, made once)" if synthetic else cfg.data.train,
        batch_size=cfg.data.batch_size,
        iters=iters,
    )
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**30
    return result


def _phase_breakdown(method, step, batches: Iterator[dict], iters: int, warmup: int, dev: torch.device,
                     cfg: DictConfig) -> dict:
    """Phase times of the step (synced around each phase), alternating with the pure-backbone reference,
    and the FLOPs / MFU of the step. Returns the result fields and the last batch (`last_batch`)."""
    from dinolike.training.ssl import SSLMethod

    acc: dict[str, float] = defaultdict(float)
    n_img = 0
    is_ssl = isinstance(method, SSLMethod)  # the pure-backbone reference and FLOPs are written for one student
    full_s: list[float] = []  # per measured iteration, without data loading
    pure_s: list[float] = []
    for i in range(warmup + iters):
        if i == warmup:
            acc.clear()
            n_img = 0
        it_acc: dict[str, float] = defaultdict(float)
        with timed(it_acc, "data", dev):
            batch = next(batches)
        step(batch, i, phase=lambda name, it_acc=it_acc: timed(it_acc, name, dev))
        pure = _pure_backbones(method, batch, dev, cfg) if is_ssl else None  # same batch, same moment
        if i < warmup:
            continue
        for k, v in it_acc.items():
            acc[k] += v
        full_s.append(sum(it_acc.values()) - it_acc["data"])
        if pure is not None:
            pure_s.append(pure)
        n_img += batch["batch_size"]
    compute_s = sum(full_s) / iters
    result = {
        "last_batch": batch,
        "img_per_s_phase_timed": n_img / sum(acc.values()),
        "step_ms": 1e3 * sum(acc.values()) / iters,
        "breakdown_ms": {k: 1e3 * v / iters for k, v in acc.items()},
    }
    if is_ssl:
        pure_mean = sum(pure_s) / iters
        result.update(
            pure_backbones_ms=1e3 * pure_mean,
            # everything beyond the backbones: heads, Sinkhorn, losses (forward and backward), clip,
            # optimizer, EMA, python
            overhead_ms=1e3 * (compute_s - pure_mean),
            overhead_ratio=min(full_s) / min(pure_s),
            overhead_ratio_median_of_pairs=statistics.median(f / p for f, p in zip(full_s, pure_s, strict=True)),
            overhead_ratio_of_means=compute_s / pure_mean,
        )
        flops = step_flops(method, batch)
        dtype = torch.bfloat16 if dev.type == "cuda" and cfg.precision.cuda == "bf16" else torch.float32
        sizes = PEAK_SIZES.get(dev.type, PEAK_SIZES["cpu"])
        peak, peak_n = peak_matmul_flops(dev, dtype, sizes)
        achieved = flops / compute_s
        result.update(
            model_tflop_per_step=flops / 1e12,
            achieved_tflops=achieved / 1e12,
            peak_matmul_tflops=peak / 1e12,
            peak_matmul=f"{peak_n}^3 {str(dtype).replace('torch.', '')}, best of n in {sizes}",
            mfu=achieved / peak,
        )
    return result


def _attention_kernel(method: torch.nn.Module, cfg: DictConfig, dev: torch.device) -> str:
    """The SDPA kernel family one attention layer of the model dispatches to at the global crop size."""
    from dinolike.layers import Attention
    from dinolike.training.step import autocast

    attn = next(m for m in method.modules() if isinstance(m, Attention))
    n_tokens = 1 + (cfg.crops.global_size // cfg.model.patch_size) ** 2
    tokens = torch.randn(2, n_tokens, attn.qkv.in_features, device=dev)  # [2, N, D]
    return attention_kernel_that_ran(attn, tokens, autocast(dev, cfg.precision))


def _pure_backbones(method, batch: dict, dev: torch.device, cfg: DictConfig) -> float:
    """Seconds of backbones only (no heads, losses, targets, optimizer, EMA): the floor the full step is
    judged by. Leaves no gradient behind (the next step starts with zero_grad anyway)."""
    from dinolike.training.step import autocast

    s_bb, t_bb = method.student["backbone"], method.teacher["backbone"]
    crops = [batch["global_crops"]] + ([batch["local_crops"]] if batch["local_crops"] is not None else [])
    masks = [batch["masks"]] + [None] * (len(crops) - 1)
    sync(dev)
    t = time.perf_counter()
    with autocast(dev, cfg.precision):
        with torch.no_grad():
            t_bb.forward_features(batch["global_crops_teacher"])
        outs = s_bb.forward_features(crops, masks=masks)
        # a stand-in scalar (not a loss): backward through the backbone is what is timed
        token_sum = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
    token_sum.backward()
    sync(dev)
    elapsed = time.perf_counter() - t
    s_bb.zero_grad(set_to_none=True)
    return elapsed


MARKDOWN_HEADER = (
    "| config | arch | batch | compiled | step ms | pure backbones ms | overhead ratio | img/s | MFU |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(name: str, res: dict) -> str:
    """One BENCHMARKS.md row (columns of MARKDOWN_HEADER)."""
    pure = res.get("pure_backbones_ms")
    ratio = res.get("overhead_ratio")
    mfu = res.get("mfu")
    return (
        f"| {name} | {res['arch']} | {res['batch_size']} | {'yes' if res['compiled'] else 'no'} "
        f"| {res['step_ms']:.0f} | {'-' if pure is None else f'{pure:.0f}'} "
        f"| {'-' if ratio is None else f'{ratio:.3f}'} | {res['img_per_s']:.1f} "
        f"| {'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
    )
