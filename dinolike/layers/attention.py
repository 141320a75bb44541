"""Multi-head self-attention.

Attention goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, a
fused kernel on CPU). xformers is used only when it is installed *and* the input is on CUDA: it has no CPU
kernel, and it must never be a requirement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional, CUDA only
    from xformers.ops import memory_efficient_attention as _xformers_attention
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _xformers_attention = None


def attention_backend(device: torch.device | str) -> str:
    """Name of the kernel family used for a tensor on `device` (printed by `dinolike bench`)."""
    if _xformers_attention is not None and torch.device(device).type == "cuda":
        return "xformers"
    return "sdpa"


class Attention(nn.Module):
    """Keys `qkv.*` and `proj.*` match the official DINOv2 backbone."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # [B, N, 3, H, hd]
        if _xformers_attention is not None and x.is_cuda:
            q, k, v = qkv.unbind(2)  # [B, N, H, hd] each: xformers' layout
            out = _xformers_attention(q, k, v).reshape(B, N, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd] each
            out = _sdpa(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`F.scaled_dot_product_attention`, in fp32 under CPU bf16 autocast.

    torch's bf16 flash-attention kernel for CPU is slow in backward at this project's sizes (pico, 17 and
    5 tokens, head dim 32: 7.3 ms a call against 1.7 ms in fp32, torch 2.14.1; BENCHMARKS.md section 6c),
    and its forward is no faster; the matmuls around it keep bf16's 2x.
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return F.scaled_dot_product_attention(q, k, v)
