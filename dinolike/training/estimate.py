"""How long a run will take: measured on its first iterations (`StepTimer`), and a FLOP bound before any.

The run's estimate is the wall time of its own first iterations on this device (`StepTimer`). Before the
first step only a FLOP count is known: the backbone's FLOPs per iteration from its weights (every Linear
weight of a block is one multiply-add per token) plus the attention matmuls, against a fraction of a
second of square matmuls. It is optimistic (it said ~17 min for a 67 min job on a CPU without bf16), so it
only serves the up-front warning of a GPU recipe started on a CPU (one that would take days), where
timing a step would itself take minutes.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from torch import nn

# matmul sizes tried for the peak, per device type (the largest reaches a GPU's steady state)
PEAK_SIZES: dict[str, tuple[int, ...]] = {"cuda": (2048, 4096, 8192), "cpu": (256, 512, 1024)}
# share of the matmul peak a training step reaches: 0.43-0.54 measured for the CPU recipe's tiny ViT
# (BENCHMARKS.md section 6, `dinolike bench ... --threads 1`); larger models do better, so this errs long
STEP_EFFICIENCY = 0.45
clock = time.perf_counter  # what StepTimer reads (a test gives it a fake one)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] | None = None,
                      min_seconds: float = 0.1) -> tuple[float, int]:
    """(best FLOP/s, the size n that reached it) over n x n @ n x n matmuls: the ceiling MFU is quoted
    against. Each size runs long enough (`min_seconds`) that launch and clock ramp-up wash out."""
    sizes = sizes or PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"])
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        reps = max(3, int(min_seconds / max(time.perf_counter() - t, 1e-9)))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        flops = 2 * n**3 * reps / (time.perf_counter() - t)
        if flops > best:
            best, best_n = flops, n
        del a, b
    return best, best_n


def backbone_forward_flops(backbone: nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass at `size` px: 2 per weight of every Linear in the blocks per
    token, the patch embedding per patch, and QK^T + AV (4 n^2 d per block). Norms, activations and the
    heads are left out (small next to these for any ViT)."""
    patches = (size // backbone.patch_size) ** 2
    tokens = 1 + backbone.num_register_tokens + patches
    dense = sum(m.weight.numel() for m in backbone.blocks.modules() if isinstance(m, nn.Linear))
    embed = sum(p.numel() for p in backbone.patch_embed.parameters())
    return 2.0 * (tokens * dense + patches * embed) + backbone.n_blocks * 4.0 * tokens**2 * backbone.embed_dim


def step_flops_per_image(cfg: DictConfig, student: nn.Module, teacher: nn.Module | None = None) -> float:
    """Training FLOPs per image of one SSL (or distillation) step: the student's forward and backward
    (3x forward) on 2 global and `crops.local_number` local crops, the teacher's forward on the 2 globals
    (`teacher`: the frozen teacher of a distillation; None: the student's own architecture, the EMA)."""
    c = cfg.crops
    forward = 2 * backbone_forward_flops(student, c.global_size) + c.local_number * backbone_forward_flops(
        student, c.local_size)
    return 3.0 * forward + 2 * backbone_forward_flops(teacher if teacher is not None else student, c.global_size)


def estimate_seconds_per_iteration(cfg: DictConfig, student: nn.Module, device: torch.device,
                                   teacher: nn.Module | None = None) -> float:
    """Seconds one iteration of this rank's batch should take here (bf16 peak on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision.cuda == "bf16" else torch.float32
    peak, _ = peak_matmul_flops(device, dtype, min_seconds=0.05)
    return step_flops_per_image(cfg, student, teacher) * cfg.data.batch_size / (peak * STEP_EFFICIENCY)


def human_duration(seconds: float) -> str:
    """'45 s', '17 min', '3.2 h', '41 days', '2.3 years': the unit a person would say."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.1f} years"


class StepTimer:
    """The run's own estimate: the wall time of its first iterations on this device, not a FLOP count.

    A FLOP count against a matmul peak said "~17 min" for a job that took 67 min on a CPU without bf16
    instructions and shared cores (issue 45): the step's real cost (memory traffic, small matmuls, the
    gradient all-reduce of several processes, a busy machine) is only known by running it. The first
    `skip` iterations (allocations, lazy init, the data loader's first batch) are left out; timing stops
    once `min_steps` iterations and `min_seconds` have passed, or after `max_steps`.
    """

    def __init__(self, start: int, device: torch.device, skip: int = 1, min_steps: int = 10,
                 min_seconds: float = 10.0, max_steps: int = 200) -> None:
        self.device, self.first = device, start + skip
        self.min_steps, self.min_seconds, self.max_steps = min_steps, min_seconds, max_steps
        self.t0: float | None = None
        self.done = False
        self.span: tuple[int, int] | None = None  # iterations timed: (after this one, up to this one)

    def tick(self, it: int, total: int) -> float | None:
        """Call after iteration `it` finished; returns the seconds per iteration once, when measured."""
        if self.done or it < self.first:
            return None
        sync(self.device)  # only while timing: a few seconds of steps on a GPU
        now = clock()
        if self.t0 is None:
            self.t0, self.span = now, (it, it)
            return None
        n, elapsed = it - self.span[0], now - self.t0
        if it >= total:  # a run shorter than the timing: nothing left to estimate
            self.done = True
            return None
        if not ((n >= self.min_steps and elapsed >= self.min_seconds) or n >= self.max_steps):
            return None
        self.done, self.span = True, (self.span[0], it)
        return elapsed / n
