"""Model construction from the `model:` config section, and strict loading of pretrained backbones."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinolike.models.heads import DINOHead
from dinolike.models.load import (
    CheckpointMismatchError,
    infer_backbone_cfg,
    load_state_strict,
)
from dinolike.models.vit import PRESETS, VisionTransformer, vit_from_preset

# model-config keys that are VisionTransformer arguments (the rest of the section is ignored here)
_VIT_KEYS = (
    "img_size patch_size in_chans embed_dim depth num_heads mlp_ratio ffn_layer layerscale "
    "drop_path_rate n_registers qkv_bias interpolate_offset interpolate_antialias"
).split()


def build_backbone(model_cfg: Mapping[str, Any], drop_path: bool = True) -> VisionTransformer:
    """A ViT from a `model:` section: `arch` preset plus explicit overrides (None = preset value)."""
    cfg = dict(model_cfg)
    kwargs = {k: cfg[k] for k in _VIT_KEYS if cfg.get(k) is not None}
    if not drop_path:
        kwargs["drop_path_rate"] = 0.0
    arch = cfg.get("arch")
    if arch in (None, "custom"):
        return VisionTransformer(**kwargs)
    return vit_from_preset(arch, **kwargs)


def load_pretrained(
    path: str | Path, model_cfg: Mapping[str, Any] | None = None, which: str = "teacher"
) -> tuple[VisionTransformer, dict[str, Any]]:
    """(model, model config) from a checkpoint; strict: a mismatch lists the offending keys.

    The config comes from (in order): the checkpoint itself (training checkpoints), `model_cfg`, a
    `.json` sidecar written by `dinolike export`, or the tensor shapes (official hub files).
    """
    from dinolike.interop.official import official_backbone_cfg, read_backbone  # also HF / timm dirs

    state, cfg = read_backbone(path, which)
    if model_cfg is not None and cfg is None:
        cfg = dict(model_cfg)
    if cfg is None:
        cfg = {**official_backbone_cfg(state), "arch": "custom"}
    model = build_backbone(cfg, drop_path=False)
    load_state_strict(model, state, what=f"backbone in {path}")
    return model.eval(), dict(cfg)


__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "DINOHead",
    "VisionTransformer",
    "build_backbone",
    "infer_backbone_cfg",
    "load_pretrained",
    "load_state_strict",
    "vit_from_preset",
]
