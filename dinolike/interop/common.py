"""Helpers shared by the format converters: errors, architecture description, FFN ratios, pos-embed resize.

Every converter speaks one internal language: a state dict with the official DINOv2 backbone keys plus a
`model:`-style dict of explicit VisionTransformer arguments (`arch: custom`), so `build_backbone(cfg)`
rebuilds the exact network without presets or guesses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinolike.layers.block import LayerScale
from dinolike.layers.mlp import SwiGLUFFN, swiglu_hidden_dim
from dinolike.models.load import CheckpointMismatchError
from dinolike.models.vit import VisionTransformer, grid_pos_embed


class InteropError(CheckpointMismatchError):
    """A file or architecture that another ecosystem cannot represent (or we cannot read); says why."""


def ffn_hidden(dim: int, mlp_ratio: float, swiglu: bool) -> int:
    """Hidden width our Block builds (HF's Dinov2 uses the same two steps, so one rule serves both)."""
    h = int(dim * mlp_ratio)
    return swiglu_hidden_dim(h) if swiglu else h


def mlp_ratio_for(dim: int, hidden: int, swiglu: bool, integer: bool = False) -> float | int:
    """An `mlp_ratio` that rebuilds an FFN of width `hidden`; integers first (HF's config demands one),
    then the exact quotient, then any nearby value (SwiGLU's rounding to 8 makes several ratios fit)."""
    exact = hidden * (1.5 if swiglu else 1.0) / dim
    ints = [r for r in (round(exact), math.floor(exact), math.ceil(exact)) if r > 0]
    for r in dict.fromkeys(ints):
        if ffn_hidden(dim, r, swiglu) == hidden:
            return int(r)
    if integer:
        raise InteropError(
            f"an FFN of width {hidden} on dim {dim} ({'SwiGLU' if swiglu else 'MLP'}) needs a non-integer "
            "mlp_ratio, which the target format cannot hold"
        )
    candidates = [exact, (int(exact * dim) + 0.5) / dim]
    if swiglu:  # SwiGLU rounds up to a multiple of 8: search the pre-rounding widths near 1.5 * hidden
        base = int(1.5 * hidden)
        candidates += [
            (x + 0.5) / dim for x in sorted(range(base - 16, base + 4), key=lambda x: abs(x - base))
        ]
    for r in candidates:
        if ffn_hidden(dim, r, swiglu) == hidden:
            return float(r)
    raise InteropError(
        f"no mlp_ratio gives an FFN of width {hidden} on dim {dim} (SwiGLU widths are multiples of 8)"
    )


def describe_backbone(model: VisionTransformer) -> dict[str, Any]:
    """Explicit architecture of a built backbone (no preset names), read off its modules."""
    blk = model.blocks[0]
    swiglu = isinstance(blk.mlp, SwiGLUFFN)
    hidden = blk.mlp.w3.in_features if swiglu else blk.mlp.fc1.out_features
    dim, p = model.embed_dim, model.patch_size
    grid = math.isqrt(model.pos_embed.shape[1] - 1)
    return {
        "arch": "custom",
        "img_size": grid * p,
        "patch_size": p,
        "in_chans": model.patch_embed.proj.in_channels,
        "embed_dim": dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "mlp_ratio": mlp_ratio_for(dim, hidden, swiglu),
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "layerscale": 1e-5 if isinstance(blk.ls1, LayerScale) else None,
        "n_registers": model.num_register_tokens,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "interpolate_offset": float(model.interpolate_offset),
        "interpolate_antialias": bool(model.interpolate_antialias),
    }


def square_grid(n_tokens: int, what: str) -> int:
    m = math.isqrt(n_tokens)
    if m * m != n_tokens:
        raise InteropError(f"{what} holds {n_tokens} patch positions, not a square grid")
    return m


def resize_pos_embed(pos: Tensor, grid: int, antialias: bool = False) -> Tensor:
    """[1, 1 + m*m, D] -> [1, 1 + grid*grid, D]: the patch part resized bicubically to exactly grid x grid
    (what our ViT does on the fly with interpolate_offset=0, so a model loaded at a new size computes what
    the source model computes at that size), the CLS position kept."""
    m = square_grid(pos.shape[1] - 1, "pos_embed")
    if m == grid:
        return pos
    patch = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, D, m, m]
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=antialias)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # [1, grid^2, D]
    return torch.cat([pos[:, :1].float(), patch], dim=1).to(pos.dtype)


def contiguous_clone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_safetensors(state: Mapping[str, Tensor], path: Path) -> None:
    """Atomic `safetensors.torch.save_file` (temp file + rename), with the `format: pt` tag transformers
    checks when it loads."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(contiguous_clone(state), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors is a dependency
        raise InteropError(f"reading {path} needs the `safetensors` package") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise InteropError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def at_eval_grid(state: Mapping[str, Tensor], cfg: Mapping[str, Any],
                 crop: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state and config with the position grid of `crop` px (the run's evaluation size), resized as the
    model resizes it, when that differs from the grid it was learned on (hf and timm exports). timm builds
    a ViT for one input size and refuses others (the main job learns a 4 x 4 grid at 28 px and runs at
    21 px); both libraries resize other grids their own way, which would differ slightly from ours."""
    patch, sd = int(cfg["patch_size"]), dict(state)
    grid = square_grid(sd["pos_embed"].shape[1] - 1, "pos_embed")
    if crop % patch or crop // patch == grid:
        return sd, dict(cfg)
    n = crop // patch
    pos = grid_pos_embed(sd["pos_embed"], n, n, float(cfg.get("interpolate_offset", 0.1)),
                         bool(cfg.get("interpolate_antialias", False)))
    sd["pos_embed"] = pos.to(sd["pos_embed"].dtype)
    return sd, {**cfg, "img_size": crop}
