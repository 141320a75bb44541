"""How long a run will take, said before the first step: model FLOPs against the device's measured speed.

A ViT-L recipe started on a laptop CPU (no GPU found, or `run.device=cpu`) used to run silently at one
iteration every several minutes. The estimate needs no step: the backbone's FLOPs per iteration come from
its weights (every Linear weight of a block is one multiply-add per token) plus the attention matmuls, and
the device's speed from a fraction of a second of square matmuls. The bench (`dinolike bench`) measures
what this only estimates; the loop replaces the estimate with the measured rate after its first rows.
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
