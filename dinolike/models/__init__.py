"""Model construction from the `model:` config section (reading files of any format is `dinolike.interop`)."""

from __future__ import annotations

from collections.abc import Mapping
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


__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "DINOHead",
    "VisionTransformer",
    "build_backbone",
    "infer_backbone_cfg",
    "load_state_strict",
    "vit_from_preset",
]
