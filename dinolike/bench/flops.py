"""Model FLOPs of one SSL step: fvcore for the dense layers, attention counted here (fvcore skips SDPA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def attention_flops(backbone: nn.Module, batch: int, tokens: int) -> float:
    """QK^T and AV of every block: 2 matmuls of B x N x N x D multiply-adds each."""
    return backbone.n_blocks * 2 * 2 * batch * tokens * tokens * backbone.embed_dim


def backbone_forward_flops(backbone: nn.Module, x: Tensor) -> float:
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
def _eager(root: nn.Module) -> Iterator[None]:
    """fvcore traces with torch.jit, which cannot trace compiled modules: uncompile them meanwhile."""
    saved = [(m, m._compiled_call_impl) for m in root.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl
