"""Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` <-> official DINOv2 keys, as pure state-dict and
config mappings (transformers is needed only to *use* the result, never here).

We write the key names of the checkpoints on the Hub (`attention.attention.query`, `mlp.weights_in`, ...):
transformers 4.x loads them as they are and 5.x renames them on load (its `conversion_mapping`), so one
directory serves both. We read both spellings.

Position embeddings: HF resizes to the exact grid (no DINOv2 +0.1 offset), bicubic, without antialias for
`dinov2` and with antialias for `dinov2_with_registers`; the dinolike config we return says the same
(`interpolate_offset=0`, `interpolate_antialias`), so tokens agree at every resolution.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinolike.interop.common import (
    InteropError,
    load_safetensors,
    mlp_ratio_for,
    save_safetensors,
    square_grid,
)
from dinolike.interop.run_info import Preprocessing

MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}

# per-layer suffix (after `encoder.layer.N.`) -> official suffix (after `blocks.N.`)
_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
# pieces that are one packed tensor on our side: official name -> ordered HF parts (both spellings)
_PACKED = {
    "attn.qkv": (
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
    "mlp.w12": (("mlp.gate_proj", "mlp.up_proj"),),
}
_EMBED_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _single(value: Any, what: str) -> int:
    """HF allows (h, w) sizes; our ViT is square."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise InteropError(
                f"HF config {what}={value} is not square; dinolike ViTs use square patches/grids"
            )
        value = value[0]
    return int(value)


def hf_config_to_dinolike(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A `Dinov2Config` / `Dinov2WithRegistersConfig` (as a dict) -> explicit dinolike model config."""
    c = dict(hf_config)
    model_type = c.get("model_type", "dinov2")
    if model_type not in MODEL_TYPES:
        raise InteropError(f"HF model_type {model_type!r} is not a DINOv2 ({', '.join(MODEL_TYPES)})")
    if c.get("hidden_act", "gelu") != "gelu":
        raise InteropError(f"HF hidden_act={c['hidden_act']!r}: dinolike blocks use exact GELU ('gelu')")
    if abs(float(c.get("layer_norm_eps", 1e-6)) - 1e-6) > 1e-12:
        raise InteropError(f"HF layer_norm_eps={c['layer_norm_eps']}: dinolike LayerNorms use 1e-6")
    regs = int(c.get("num_register_tokens", 4)) if model_type == "dinov2_with_registers" else 0
    patch = _single(c.get("patch_size", 14), "patch_size")
    return {
        "arch": "custom",
        "img_size": _single(c.get("image_size", 224), "image_size"),
        "patch_size": patch,
        "in_chans": int(c.get("num_channels", 3)),
        "embed_dim": int(c["hidden_size"]),
        "depth": int(c["num_hidden_layers"]),
        "num_heads": int(c["num_attention_heads"]),
        "mlp_ratio": c.get("mlp_ratio", 4),
        "ffn_layer": "swiglu" if c.get("use_swiglu_ffn", False) else "mlp",
        "layerscale": float(c.get("layerscale_value", 1.0)) or 1.0,  # HF always has the gammas
        "n_registers": regs,
        "qkv_bias": bool(c.get("qkv_bias", True)),
        "interpolate_offset": 0.0,
        "interpolate_antialias": model_type == "dinov2_with_registers",
    }


def hf_to_dinolike(
    state: Mapping[str, Tensor], hf_config: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(official-key state dict, dinolike config) from an HF DINOv2 state dict and its config.

    Keys we do not know are passed through unchanged, so the strict load that follows names them.
    """
    cfg = hf_config_to_dinolike(hf_config)
    out: dict[str, Tensor] = {}
    parts: dict[str, Tensor] = {}  # HF pieces of packed tensors, by their official-side key
    for key, v in state.items():
        k = re.sub(r"^(dinov2|dinov2_with_registers)\.", "", key)
        if k in _EMBED_RENAMES:
            out[_EMBED_RENAMES[k]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k)
        if m is None:
            out[key] = v
            continue
        i, mod, leaf = m.groups()
        if f"{mod}.{leaf}" in _LAYER_RENAMES:  # layer_scale*.lambda1
            out[f"blocks.{i}.{_LAYER_RENAMES[f'{mod}.{leaf}']}"] = v
        elif mod in _LAYER_RENAMES:
            out[f"blocks.{i}.{_LAYER_RENAMES[mod]}.{leaf}"] = v
        elif any(mod in names for spellings in _PACKED.values() for names in spellings):
            parts[f"blocks.{i}.{mod}.{leaf}"] = v
        else:
            out[key] = v
    for key in sorted(parts):
        if key not in parts:  # consumed already as a sibling of a packed tensor
            continue
        i, mod, leaf = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key).groups()
        for ours, spellings in _PACKED.items():
            names = next((s for s in spellings if mod in s), None)
            if names is None:
                continue
            found = [f"blocks.{i}.{n}.{leaf}" for n in names]
            missing = [
                f"encoder.layer.{i}.{n}.{leaf}" for n, f in zip(names, found, strict=True) if f not in parts
            ]
            if missing:
                raise InteropError(
                    f"HF state dict lacks {', '.join(missing)} (needed to build blocks.{i}.{ours})"
                )
            out[f"blocks.{i}.{ours}.{leaf}"] = torch.cat([parts.pop(f) for f in found], dim=0)
            break
    if "mask_token" in out and out["mask_token"].dim() == 3:  # some exports keep [1, 1, D]
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    if "mask_token" not in out and "pos_embed" in out:  # use_mask_token=False: DINOv2's zero init
        out["mask_token"] = torch.zeros(1, cfg["embed_dim"], dtype=out["pos_embed"].dtype)
    return out, cfg


def dinolike_to_hf(
    state: Mapping[str, Tensor], cfg: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(HF state dict with Hub key names, config.json dict) from official keys + explicit dinolike config.

    HF always has LayerScale, so a model without it gets gammas of one (the same function).
    """
    c = dict(cfg)
    dim, regs = int(c["embed_dim"]), int(c.get("n_registers") or 0)
    swiglu = c.get("ffn_layer") == "swiglu"
    hidden = state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
    ratio = mlp_ratio_for(dim, hidden, swiglu, integer=True)  # transformers 5 types mlp_ratio as int
    grid = square_grid(state["pos_embed"].shape[1] - 1, "pos_embed")
    model_type = "dinov2_with_registers" if regs else "dinov2"
    hf_cfg: dict[str, Any] = {
        "architectures": [MODEL_TYPES[model_type]],
        "model_type": model_type,
        "hidden_size": dim,
        "num_hidden_layers": int(c["depth"]),
        "num_attention_heads": int(c["num_heads"]),
        "mlp_ratio": ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": grid * int(c["patch_size"]),
        "patch_size": int(c["patch_size"]),
        "num_channels": int(c.get("in_chans", 3)),
        "qkv_bias": bool(c.get("qkv_bias", True)),
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": swiglu,
    }
    if regs:
        hf_cfg["num_register_tokens"] = regs
    inverse_embed = {v: k for k, v in _EMBED_RENAMES.items()}
    inverse_layer = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.w12": "mlp.weights_in",
        "mlp.w3": "mlp.weights_out",
    }
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k in inverse_embed:
            out[inverse_embed[k]] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+?)(?:\.(weight|bias))?$", k)
        if m is None:
            raise InteropError(f"no Hugging Face name for key {k!r}")
        i, mod, leaf = m.groups()
        pre = f"encoder.layer.{i}."
        if mod == "attn.qkv":
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):
                out[f"{pre}attention.attention.{name}.{leaf}"] = part
        elif mod in inverse_layer:
            out[pre + inverse_layer[mod] + (f".{leaf}" if leaf else "")] = v
        else:
            raise InteropError(f"no Hugging Face name for key {k!r}")
    depth = int(c["depth"])
    if "blocks.0.ls1.gamma" not in state:  # no LayerScale: identity gammas
        for i in range(depth):
            for j in (1, 2):
                out[f"encoder.layer.{i}.layer_scale{j}.lambda1"] = torch.ones(dim)
    if "embeddings.mask_token" not in out:  # e.g. converted from timm, which has none; HF's init value
        out["embeddings.mask_token"] = torch.zeros(1, dim)
    return out, hf_cfg


def preprocessor_config(prep: Preprocessing, channels: int) -> dict[str, Any]:
    """`preprocessor_config.json` of the `BitImageProcessor` the Hub's DINOv2 models use, with the run's
    numbers: `AutoImageProcessor.from_pretrained(DIR)` then prepares images as the run's eval did."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": prep.resize},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": prep.crop, "width": prep.crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
        "do_convert_rgb": channels == 3,  # a grey-scale model must not be handed three channels
    }


def save_hf(
    out_dir: str | Path, state: Mapping[str, Tensor], cfg: Mapping[str, Any], prep: Preprocessing | None = None
) -> Path:
    """`config.json` + `model.safetensors` that `transformers.Dinov2Model.from_pretrained(out_dir)` (or
    `Dinov2WithRegistersModel` for register models) loads, and with `prep` a `preprocessor_config.json`."""
    out_dir = Path(out_dir)
    hf_state, hf_cfg = dinolike_to_hf(state, cfg)
    save_safetensors(hf_state, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if prep is not None:
        proc = preprocessor_config(prep, int(hf_cfg["num_channels"]))
        (out_dir / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return out_dir


def is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in MODEL_TYPES


def load_hf(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(official-key state dict, dinolike config) from a Hugging Face model directory (safetensors or
    pytorch_model.bin)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InteropError(f"{path} has no config.json; not a Hugging Face model directory")
    hf_cfg = json.loads(cfg_file.read_text())
    if (path / "model.safetensors").is_file():
        state = load_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise InteropError(
            f"{path} holds neither model.safetensors nor pytorch_model.bin (sharded files are "
            "not supported: DINOv2 backbones fit one file)"
        )
    return hf_to_dinolike(state, hf_cfg)
