"""What the device can do and what it did: matmul peak, the SDPA kernel that ran, timers.

The peak is the best of several square matmul sizes: a 2048^2 bf16 matmul reached only 590 TFLOP/s on
an H200 that does ~790 at 8192^3, so an MFU quoted against one small size flatters the model by ~30 %.
On a CPU the sizes stay small (seconds, not minutes, on 2 shared cores).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn

from dinolike.training.estimate import PEAK_SIZES, peak_matmul_flops, sync  # noqa: F401 - the bench's names too

# aten op name (substring) -> kernel family, most specific first (the CPU flash op also names "flash")
_SDPA_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_efficient_attention_forward", "efficient"),
    ("xformers", "xformers"),
)
SDPA_CHOICES = ("auto", "cudnn", "flash", "efficient", "math")


@contextmanager
def timed(acc: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Adds the phase's wall time to acc[name]; syncs the device on both sides (so the bench's phase
    breakdown is exact, and its img/s is measured elsewhere, without these syncs)."""
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    acc[name] += time.perf_counter() - t


def sdpa_context(choice: str) -> AbstractContextManager:
    """`auto`: torch's own choice; otherwise only that SDPA kernel (an error where it cannot run, so a
    number is never silently measured with another kernel)."""
    if choice == "auto":
        return contextlib.nullcontext()
    if choice not in SDPA_CHOICES:
        raise ValueError(f"--sdpa must be one of {', '.join(SDPA_CHOICES)}, got {choice!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[choice]
    return sdpa_kernel([backend])


def attention_kernel_that_ran(attn: nn.Module, tokens: Tensor, autocast: AbstractContextManager) -> str:
    """Runs `attn` once on `tokens` [B, N, D] and names the attention kernel family that dispatched
    (cudnn, flash, efficient, math, flash (cpu), xformers): what ran, not what is enabled. SDPA picks
    its kernel inside the dispatcher, so the aten ops are recorded below it (a dispatch mode, no
    profiler). The probe is eager; a compiled block calls the same SDPA op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), autocast, _Record():
        attn(tokens)
    for op, family in _SDPA_OPS:
        if any(op in name for name in seen):
            return family
    return "math"  # the math path is composite: it reaches the dispatcher as plain matmuls and softmax
