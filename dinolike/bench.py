"""`dinolike bench --config FILE [key=value ...]`: time the real training step.

Reports img/s, a step-time breakdown (data, teacher forward, student forward + losses, backward,
optimizer, EMA), peak memory, model FLOPs (fvcore for the dense layers, attention counted here because
fvcore skips SDPA) and MFU against the matmul throughput measured on the same device in the same run.
It also times the "pure" reference (student backbone forward/backward plus teacher backbone forward on the
same batch, no heads or losses) so the overhead of everything else is one number.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    with torch.no_grad():
        student = sum(backbone_forward_flops(s, c[:1]) * c.shape[0] for c in crops)
        teacher = backbone_forward_flops(method.teacher["backbone"], batch["global_crops"][:1])
    return 3 * student + teacher * batch["global_crops"].shape[0]


def run_bench(cfg: DictConfig, iters: int, warmup: int) -> dict:
    from dinolike import dist
    from dinolike.layers import attention_backend
    from dinolike.train.data import build_train_loader
    from dinolike.train.loop import _autocast, build_method
    from dinolike.train.optim import apply_schedule, build_optimizer
    from dinolike.train.schedules import build_schedules
    from dinolike.train.ssl import ssl_loss_terms

    env = dist.init_distributed(cfg.run.device)
    dev = env.device
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg).to(dev)
    method.prepare_distributed(env)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    params = [p for g in opt.param_groups for p in g["params"]]
    sched = build_schedules(cfg, cfg.data.batch_size * env.world_size)
    loader = iter(build_train_loader(cfg, env, start_position=0))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    acc: dict[str, float] = defaultdict(float)
    n_img = 0
    is_ssl = hasattr(method, "teacher_targets") and not hasattr(method, "students")
    for i in range(warmup + iters):
        if i == warmup:
            acc.clear()
            n_img = 0
        with _timed(acc, "data", dev):
            batch = method.to_device(next(loader), dev)
        s = sched.at(i)
        apply_schedule(opt, s["lr"], s["last_layer_lr"], s["wd"])
        with _autocast(dev, cfg):
            if is_ssl:
                with _timed(acc, "teacher_forward", dev):
                    t_out = method.teacher_targets(method.teacher, batch, s["teacher_temp"])
                with _timed(acc, "student_forward_and_losses", dev):
                    method.student.train()
                    loss, _ = ssl_loss_terms(method.cfg, method.student, t_out, batch)
            else:
                with _timed(acc, "forward_and_losses", dev):
                    loss, _ = method.forward_loss(batch, s)
        with _timed(acc, "backward", dev):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.sync_gradients()
        with _timed(acc, "optimizer", dev):
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad, foreach=True)
            opt.step()
        with _timed(acc, "ema", dev):
            method.after_step(s)
        n_img += batch["batch_size"]
    step_s = sum(acc.values()) / iters
    result = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "attention_backend": attention_backend(dev),
        "batch_size": cfg.data.batch_size,
        "iters": iters,
        "img_per_s": n_img / sum(acc.values()),
        "step_ms": 1e3 * step_s,
        "breakdown_ms": {k: 1e3 * v / iters for k, v in acc.items()},
    }
    if is_ssl:
        result.update(_pure_reference(method, batch, dev, cfg, iters, step_s - acc["data"] / iters))
        flops = step_flops(method, batch)
        dtype = torch.bfloat16 if dev.type == "cuda" and cfg.dist.mixed_precision == "bf16" else torch.float32
        peak = peak_matmul_flops(dev, dtype)
        achieved = flops / (step_s - acc["data"] / iters)
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


def _pure_reference(method, batch: dict, dev: torch.device, cfg: DictConfig, iters: int, step_s: float) -> dict:
    """Backbones only (no heads, losses, centering, optimizer, EMA): the floor the full step is judged by."""
    from dinolike.train.loop import _autocast

    s_bb, t_bb = method.student["backbone"], method.teacher["backbone"]
    crops = [batch["global_crops"]] + ([batch["local_crops"]] if batch["local_crops"] is not None else [])
    masks = [batch["masks"]] + [None] * (len(crops) - 1)

    def once() -> None:
        with _autocast(dev, cfg):
            with torch.no_grad():
                t_bb.forward_features(batch["global_crops_teacher"])
            outs = s_bb.forward_features(crops, masks=masks)
            loss = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
        loss.backward()
        s_bb.zero_grad(set_to_none=True)

    once()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        once()
    _sync(dev)
    pure = (time.perf_counter() - t) / iters
    return {"pure_backbones_ms": 1e3 * pure, "overhead_ratio": step_s / pure}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dinolike bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, ["run.progress=false", *args.overrides])
    except ConfigError as e:
        print(f"dinolike bench: config error: {e}", file=sys.stderr)
        return 2
    res = run_bench(cfg, args.iters, args.warmup)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
