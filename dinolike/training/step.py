"""The one training step: what the loop runs every iteration and `dinolike bench` times.

schedule -> forward (loss, metrics) -> backward (+ gradient sync, the metrics summed with it) -> [finite
check] -> clip -> optimizer step -> after_step (EMA). A second copy of this sequence drifts (the bench's
once clipped every gradient as one group while the loop clipped per student), so there is none: the bench
passes timers as `phase`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinolike.training.method import Method, Phase, untimed
from dinolike.training.optim import apply_schedule


@functools.cache
def native_cpu_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (avx512_bf16 or AMX): there a bf16 matmul runs at ~2x
    fp32, elsewhere it is emulated at ~1/100 (torch's mkldnn check only asks for AVX-512, not for bf16).
    Asked once per process: `autocast` reads it every step."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_bf16(precision: DictConfig) -> bool:
    """`precision.cpu`: bf16, fp32, or auto (bf16 exactly where `native_cpu_bf16()`)."""
    return native_cpu_bf16() if precision.cpu == "auto" else precision.cpu == "bf16"


def autocast(device: torch.device, precision: DictConfig) -> AbstractContextManager:
    """bf16 autocast on CUDA when `precision.cuda` asks for it, on CPU when `precision.cpu` does;
    fp32 otherwise.

    CPU bf16: on a CPU with bf16 instructions (avx512_bf16) the matmuls run at ~2x, on one without them
    ~100x slower; `auto` decides by the CPU. Attention runs in fp32 under it
    (`layers.attention._sdpa`), the losses and Sinkhorn-Knopp already do.
    """
    if device.type == "cuda" and precision.cuda == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16(precision):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    method: Method,
    opt: torch.optim.Optimizer,
    batch: dict,
    sched: dict[str, float],
    device: torch.device,
    clip_groups: list[list[nn.Parameter]],
    check: Callable[[dict[str, Tensor]], None] | None = None,
    phase: Phase = untimed,
) -> dict[str, Tensor]:
    """One optimisation step on a batch already on `device`; returns the metrics of its forward pass.

    sched: this iteration's schedule values (lr, last_layer_lr, wd, momentum, teacher_temp).
    clip_groups: `method.grad_clip_groups()`, computed once by the caller; each group's gradient norm is
    clipped to `optim.clip_grad` on its own (distillation: one group per student).
    check: the loop's NaN / inf check, or None; called after backward and before the optimizer step with
    the metrics summed over ranks (a NaN on one rank reaches all, so all stop together).
    phase: name -> context around each phase ("teacher_forward", "student_forward_and_losses",
    "backward", "optimizer", "ema"); the bench times them, training leaves them untimed.
    """
    cfg = method.cfg
    apply_schedule(opt, sched["lr"], sched["last_layer_lr"], sched["wd"])
    with autocast(device, cfg.precision):
        loss, metrics = method.forward_loss(batch, sched, phase)
    names = sorted(metrics)
    with phase("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in names]) if check else None  # [M]
        # DDP all-reduce / FSDP reshard, before the clip sees the gradients; the metrics ride along, summed
        summed = method.sync_gradients(values)
    if check is not None:  # before the optimizer: a NaN step changes no weight, on any rank
        check(dict(zip(names, summed, strict=True)))
    with phase("optimizer"):
        if cfg.optim.clip_grad > 0:
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.optim.clip_grad, foreach=True)
        opt.step()
    with phase("ema"):
        method.after_step(sched)
    return metrics
