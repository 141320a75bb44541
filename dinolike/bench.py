"""`dinolike bench --config FILE [key=value ...]`: time the real training step.

It runs the loop's own `train_step` (dinolike/train/step.py) with a timer around each phase, so what is
timed is what trains. Reports img/s, a step-time breakdown (data, teacher forward, student forward +
losses, backward, optimizer with the gradient clip, EMA), peak memory, model FLOPs (fvcore for the dense
layers, attention counted here because fvcore skips SDPA) and MFU against the matmul throughput measured
on the same device in the same run.
It also times the "pure" reference (student backbone forward/backward plus teacher backbone forward on the
same batch, no heads or losses) so the overhead of everything else is one number: `overhead_ratio`.

The full step and the pure reference alternate, iteration by iteration, and `overhead_ratio` is the
ratio of their fastest iterations: on a machine shared with other jobs, load changes over seconds and
only slows things down, so the fastest of several alternating runs is the least disturbed one of each
(the median of the per-iteration ratios and the ratio of the means are reported next to it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from omegaconf import DictConfig

from dinolike.config import ConfigError, load_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _timed(acc: dict[str, float], name: str, device: torch.device):
    _sync(device)
    t = time.perf_counter()
    yield
    _sync(device)
    acc[name] += time.perf_counter() - t


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of a large square matmul: the ceiling MFU is quoted against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def attention_flops(backbone: torch.nn.Module, batch: int, tokens: int) -> float:
    """QK^T and AV of every block: 2 matmuls of B x N x N x D multiply-adds each."""
    return backbone.n_blocks * 2 * 2 * batch * tokens * tokens * backbone.embed_dim


def backbone_forward_flops(backbone: torch.nn.Module, x: torch.Tensor) -> float:
    """Dense-layer FLOPs from fvcore (it counts multiply-adds, hence x2) plus our attention count."""
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(backbone, (x,))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    n_tokens = 1 + backbone.num_register_tokens + (x.shape[-2] // backbone.patch_size) * (
        x.shape[-1] // backbone.patch_size
    )
    return 2.0 * fca.total() + attention_flops(backbone, x.shape[0], n_tokens)


def step_flops(method, batch: dict) -> float:
    """Backbone FLOPs of one SSL step: student forward + backward (3x forward) on every crop, teacher
    forward on the global crops. Heads are small next to the backbone and left out (stated in the output)."""
    s = method.student["backbone"]
    crops = [batch["global_crops"]] + ([batch["local_crops"]] if batch["local_crops"] is not None else [])
    with torch.no_grad(), _eager(method):
        student = sum(backbone_forward_flops(s, c[:1]) * c.shape[0] for c in crops)
        teacher = backbone_forward_flops(method.teacher["backbone"], batch["global_crops"][:1])
    return 3 * student + teacher * batch["global_crops"].shape[0]


@contextmanager
def _eager(root: torch.nn.Module):
    """fvcore traces with torch.jit, which cannot trace compiled modules: uncompile them meanwhile."""
    saved = [(m, m._compiled_call_impl) for m in root.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


def synthetic_batch(cfg: DictConfig, batch_size: int, generator: torch.Generator) -> dict:
    """A batch with the collate's keys and shapes (random pixels, real block masks): times the step
    without the data pipeline, so the numbers do not depend on how fast this machine augments."""
    from dinolike.data.masking import MaskSampler

    c, chans = cfg.crops, cfg.model.in_chans
    g = torch.randn(2 * batch_size, chans, c.global_size, c.global_size, generator=generator)  # [2B, C, H, W]
    loc = None
    if c.local_number:
        loc = torch.randn(c.local_number * batch_size, chans, c.local_size, c.local_size, generator=generator)
    grid = c.global_size // cfg.model.patch_size
    sampler = MaskSampler((grid, grid), cfg.masking.probability, tuple(cfg.masking.ratio))
    masks = torch.stack([sampler(generator).flatten() for _ in range(2 * batch_size)]).bool()  # [2B, N]
    mask_indices = masks.flatten().nonzero().flatten()  # [M]
    per_crop = masks.sum(dim=-1).clamp_min(1).float()  # [2B]
    return {
        "global_crops": g,
        "global_crops_teacher": g,
        "local_crops": loc,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": (1.0 / per_crop)[:, None].expand_as(masks)[masks],  # [M]
        "n_masked": int(mask_indices.numel()),
        "labels": torch.zeros(batch_size, dtype=torch.long),
        "indices": torch.arange(batch_size),
        "positions": torch.arange(batch_size),
        "skipped": 0,
        "batch_size": batch_size,
    }


def _batches(cfg: DictConfig, env, synthetic: bool):
    if synthetic:
        batch = synthetic_batch(cfg, cfg.data.batch_size, torch.Generator().manual_seed(cfg.run.seed))
        while True:
            yield batch
    from dinolike.train.data import build_train_loader

    yield from build_train_loader(cfg, env, start_position=0)


def run_bench(cfg: DictConfig, iters: int, warmup: int, synthetic: bool = False) -> dict:
    """Time `train_step` (the loop's own step) phase by phase, and the pure-backbone reference beside it."""
    from dinolike import dist
    from dinolike.layers import attention_backend
    from dinolike.train.loop import build_method
    from dinolike.train.optim import build_optimizer
    from dinolike.train.schedules import build_schedules
    from dinolike.train.ssl import SSLMethod, compile_step_modules
    from dinolike.train.step import train_step

    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    env = dist.init_distributed(cfg.run.device)
    dev = env.device
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg).to(dev)
    method.prepare_distributed(env)
    if cfg.run.compile:
        compile_step_modules(method)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    clip_groups = method.grad_clip_groups()  # as the loop: distillation clips per student
    sched = build_schedules(cfg, cfg.data.batch_size * env.world_size)
    loader = _batches(cfg, env, synthetic)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
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
        with _timed(it_acc, "data", dev):
            batch = method.to_device(next(loader), dev)
        train_step(method, opt, batch, sched.at(i), dev, clip_groups,
                   phase=lambda name, it_acc=it_acc: _timed(it_acc, name, dev))
        pure = _pure_backbones(method, batch, dev, cfg) if is_ssl else None  # same batch, same moment
        if i < warmup:
            continue
        for k, v in it_acc.items():
            acc[k] += v
        full_s.append(sum(it_acc.values()) - it_acc["data"])
        if pure is not None:
            pure_s.append(pure)
        n_img += batch["batch_size"]
    step_s = sum(acc.values()) / iters
    compute_s = sum(full_s) / iters
    result = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "arch": cfg.model.arch,
        "attention_backend": attention_backend(dev),
        "compiled": bool(cfg.run.compile),
        "data": "synthetic" if synthetic else cfg.data.train,
        "batch_size": cfg.data.batch_size,
        "iters": iters,
        "img_per_s": n_img / sum(acc.values()),
        "step_ms": 1e3 * step_s,
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
        dtype = torch.bfloat16 if dev.type == "cuda" and cfg.dist.mixed_precision == "bf16" else torch.float32
        peak = peak_matmul_flops(dev, dtype)
        achieved = flops / compute_s
        result.update(
            model_tflop_per_step=flops / 1e12,
            achieved_tflops=achieved / 1e12,
            peak_matmul_tflops=peak / 1e12,
            peak_dtype=str(dtype).replace("torch.", ""),
            mfu=achieved / peak,
        )
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def _pure_backbones(method, batch: dict, dev: torch.device, cfg: DictConfig) -> float:
    """Seconds of backbones only (no heads, losses, targets, optimizer, EMA): the floor the full step is
    judged by. Leaves no gradient behind (the next step starts with zero_grad anyway)."""
    from dinolike.train.step import autocast

    s_bb, t_bb = method.student["backbone"], method.teacher["backbone"]
    crops = [batch["global_crops"]] + ([batch["local_crops"]] if batch["local_crops"] is not None else [])
    masks = [batch["masks"]] + [None] * (len(crops) - 1)
    _sync(dev)
    t = time.perf_counter()
    with autocast(dev, cfg):
        with torch.no_grad():
            t_bb.forward_features(batch["global_crops_teacher"])
        outs = s_bb.forward_features(crops, masks=masks)
        # a stand-in scalar (not a loss): backward through the backbone is what is timed
        token_sum = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
    token_sum.backward()
    _sync(dev)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinolike bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="recipe yaml whose step is timed")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (allocator, kernels)")
    p.add_argument("--synthetic", action="store_true", help="random crops and masks, no data pipeline")
    p.add_argument("--markdown", action="store_true", help="also print a BENCHMARKS.md table row")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        print("dinolike bench: error: --iters must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, ["run.progress=false", *args.overrides])
    except ConfigError as e:
        print(f"dinolike bench: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_bench(cfg, args.iters, args.warmup, synthetic=args.synthetic)
    res["threads"] = torch.get_num_threads()
    text = json.dumps(res, indent=2)
    print(text)
    if args.markdown:
        print(MARKDOWN_HEADER)
        print(markdown_row(args.config, res))
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
