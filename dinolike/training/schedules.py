"""Schedules as arrays precomputed once and indexed by iteration (learning rate, weight decay, teacher
momentum and temperature). Precomputing makes them trivially resumable: the iteration is the state."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig


def cosine_schedule(
    start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0, freeze: int = 0
) -> np.ndarray:
    """`freeze` iterations at 0, then linear warmup from `warmup_start` to `start`, then cosine to `end`."""
    freeze = min(freeze, total)
    warmup = min(warmup, total - freeze)
    n_cos = total - freeze - warmup
    cos = end + 0.5 * (start - end) * (1 + np.cos(np.pi * np.arange(n_cos) / max(n_cos, 1)))
    return np.concatenate([np.zeros(freeze), np.linspace(warmup_start, start, warmup, endpoint=False), cos])


def constant_schedule(value: float, end: float, total: int, warmup: int = 0, cooldown: int = 0) -> np.ndarray:
    """Linear warmup from 0 to `value`, `value` held, then a linear cooldown to `end` over the last
    `cooldown` iterations (0: held to the end). The alternative to the cosine for short runs, where the
    cosine spends its second half at a fraction of the peak."""
    warmup = min(warmup, total)
    cooldown = min(cooldown, total - warmup)
    held = total - warmup - cooldown
    return np.concatenate([np.linspace(0.0, value, warmup, endpoint=False), np.full(held, value),
                           np.linspace(value, end, cooldown)])


def warmup_then_constant(start: float, end: float, total: int, warmup: int) -> np.ndarray:
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(start, end, warmup, endpoint=False), np.full(total - warmup, end)])


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """DINOv2 scales the base learning rate (given for batch 1024) by sqrt(batch / 1024)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear":
        return base_lr * global_batch / 1024
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling must be sqrt, linear or none, got {rule!r}")


@dataclass
class Schedules:
    lr: np.ndarray
    last_layer_lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @property
    def total(self) -> int:
        return len(self.lr)

    def at(self, it: int) -> dict[str, float]:
        i = min(it, self.total - 1)
        return {k: float(getattr(self, k)[i]) for k in ("lr", "last_layer_lr", "wd", "momentum", "teacher_temp")}


def build_schedules(cfg: DictConfig, global_batch: int) -> Schedules:
    o, t = cfg.optim, cfg.teacher
    ep = o.epoch_length
    total = int(round(o.epochs * ep))  # fractional epochs: a short phase is a fraction of one
    if total <= 0:
        raise ValueError("optim.epochs * optim.epoch_length must be positive")
    peak = scaled_lr(o.base_lr, global_batch, o.lr_scaling)
    warmup = int(o.warmup_epochs * ep)
    if o.lr_schedule == "constant":
        lr = constant_schedule(peak, o.min_lr, total, warmup, cooldown=int(o.lr_cooldown_epochs * ep))
    else:
        lr = cosine_schedule(peak, o.min_lr, total, warmup=warmup)
    last = lr.copy()
    last[: int(o.freeze_last_layer_epochs * ep)] = 0.0  # the prototypes stay put while the rest settles
    return Schedules(
        lr=lr,
        last_layer_lr=last,
        wd=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
        momentum=cosine_schedule(t.momentum, t.final_momentum, total),
        teacher_temp=warmup_then_constant(t.warmup_temp, t.temp, total, int(t.warmup_temp_epochs * ep)),
    )
