"""Pre-norm transformer block with LayerScale and batch-subset stochastic depth."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinolike.layers.attention import Attention
from dinolike.layers.mlp import Mlp, SwiGLUFFN


class LayerScale(nn.Module):
    """Per-channel residual gain (key `gamma`), initialised small so deep ViTs start near identity."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def residual_with_drop_path(
    x: Tensor, branch: Callable[[Tensor], Tensor], drop: float, training: bool
) -> Tensor:
    """x + branch(x), where in training each sample's branch is dropped with probability `drop`.

    As in the DINOv2 paper, the dropped samples are not computed at all: the branch runs on a random
    subset of ceil-free size max(int(B * (1 - drop)), 1) and its output is scaled by B / subset, which
    keeps the expectation while saving (drop * 100)% of the block's compute.
    """
    if not training or drop <= 0.0:
        return x + branch(x)
    b = x.shape[0]
    keep = max(int(b * (1.0 - drop)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]  # [keep]
    out = branch(x[idx])  # [keep, N, D]
    return torch.index_add(x, 0, idx, out.to(x.dtype), alpha=b / keep)


CHECKPOINT_SCOPES = ("none", "block", "attn", "mlp")


def _recomputed(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """fn whose activations are dropped after forward and recomputed in backward (RNG state replayed)."""
    return lambda x: checkpoint(fn, x, use_reentrant=False)


class Block(nn.Module):
    """Keys `norm1`, `attn`, `ls1`, `norm2`, `mlp`, `ls2` as in the official backbone.

    `checkpoint_scope` trades compute for memory in training: "block" recomputes the whole block in
    backward (least memory, ~1 extra forward), "mlp" or "attn" only that branch (the MLP holds most of
    a block's saved activations: its 4x-wide hidden layer before and after the GELU).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        layerscale: float | None = 1e-5,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn = {"mlp": Mlp, "swiglu": SwiGLUFFN}.get(ffn_layer)
        if ffn is None:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}: use 'mlp' or 'swiglu'")
        self.mlp = ffn(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path
        self.checkpoint_scope = "none"

    def _attn(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x: Tensor) -> Tensor:
        scope = self.checkpoint_scope if self.training and torch.is_grad_enabled() else "none"
        attn = _recomputed(self._attn) if scope == "attn" else self._attn
        ffn = _recomputed(self._ffn) if scope == "mlp" else self._ffn
        x = residual_with_drop_path(x, attn, self.drop_path, self.training)
        return residual_with_drop_path(x, ffn, self.drop_path, self.training)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        if self.checkpoint_scope == "block" and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
