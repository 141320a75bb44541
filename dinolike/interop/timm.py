"""timm `vit_*_patch14_dinov2` / `vit_*_patch14_reg4_dinov2` <-> official DINOv2 keys (pure mappings).

timm keeps the official names for all but three things:
- registers are `reg_token`, and the register variants use `no_embed_class=True`: `pos_embed` covers the
  patches only and the CLS token gets no position. Ours adds `pos_embed[:, 0]` to CLS, so timm -> ours
  puts a zero there, and ours -> timm folds it into `cls_token` (the same fp32 sum, so bit-exact);
- the packed SwiGLU (`SwiGLUPacked`) calls `w12`/`w3` `fc1`/`fc2`;
- there is no `mask_token` (only iBOT training needs it): timm -> ours gives it zeros, DINOv2's init.
timm resizes positions to the exact grid, bicubic with antialias; the returned config says the same.
"""

from __future__ import annotations

import json
import math
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
from dinolike.interop.run_info import Preprocessing, preprocessing

# timm's DINOv2 entries: (width, blocks, heads, FFN) of each size, all with 14 px patches
_OFFICIAL = {"small": (384, 12, 6, "mlp"), "base": (768, 12, 12, "mlp"), "large": (1024, 24, 16, "mlp"),
             "giant": (1536, 40, 24, "swiglu")}


def timm_to_dinolike(
    state: Mapping[str, Tensor], model_args: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(official-key state dict, dinolike config) from a timm DINOv2 ViT state dict.

    Shapes give everything but the head count: `model_args["num_heads"]` when given (a timm config's
    `model_args`), else dim / 64 as in every DINOv2 model; `model_args["img_size"]` is only a cross-check.
    """
    args = dict(model_args or {})
    sd = dict(state)
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise InteropError(
            f"not a timm ViT state dict: no patch_embed.proj.weight / pos_embed "
            f"(first keys: {', '.join(sorted(sd)[:6])})"
        )
    w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    if w.shape[2] != w.shape[3]:
        raise InteropError(f"patch {tuple(w.shape[2:])} is not square")
    reg = sd.pop("reg_token", None)  # [1, R, D]
    n_reg = 0 if reg is None else reg.shape[1]
    pos = sd.pop("pos_embed")  # [1, L, D]
    L = pos.shape[1]
    cls = sd["cls_token"]
    if math.isqrt(L) ** 2 == L and L > 1:  # no_embed_class: patches only
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    elif math.isqrt(L - 1) ** 2 == L - 1:  # class position, registers without positions
        pass
    elif n_reg and math.isqrt(L - 1 - n_reg) ** 2 == L - 1 - n_reg:  # positions for the registers too
        reg = reg + pos[:, 1 : 1 + n_reg]  # a constant per register: fold it into the token
        pos = torch.cat([pos[:, :1], pos[:, 1 + n_reg :]], dim=1)
    else:
        raise InteropError(f"timm pos_embed of {L} tokens fits no square grid with {n_reg} registers")
    sd["cls_token"], sd["pos_embed"] = cls, pos
    if reg is not None:
        sd["register_tokens"] = reg
    sd.setdefault("mask_token", torch.zeros(1, dim, dtype=pos.dtype))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    if swiglu:
        for i in range(depth):
            for leaf in ("weight", "bias"):
                for a, b in (("fc1", "w12"), ("fc2", "w3")):
                    if f"blocks.{i}.mlp.{a}.{leaf}" in sd:
                        sd[f"blocks.{i}.mlp.{b}.{leaf}"] = sd.pop(f"blocks.{i}.mlp.{a}.{leaf}")
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    grid = square_grid(pos.shape[1] - 1, "timm pos_embed")
    if args.get("img_size") not in (None, grid * patch) and int(args["img_size"]) // patch != grid:
        raise InteropError(
            f"timm model_args img_size={args['img_size']} disagrees with a {grid}x{grid} pos_embed"
        )
    cfg = {
        "arch": "custom",
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": int(args.get("num_heads") or max(dim // 64, 1)),
        "mlp_ratio": mlp_ratio_for(dim, hidden, swiglu),
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "layerscale": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        "n_registers": n_reg,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "interpolate_offset": 0.0,
        "interpolate_antialias": True,
    }
    return sd, cfg


def timm_model_name(cfg: Mapping[str, Any]) -> str:
    """The `architecture` of timm's config.json: the registered DINOv2 entry when the model has one of its
    shapes (`vit_small_patch14_dinov2` is 384-d, 12 blocks, 6 heads, patch 14), else the entry that builds
    this structure (timm requires a registered name; `model_args` set every size) tagged with the real
    architecture: `vit_small_patch14_dinov2.dinolike_96d_4x3h_patch8_28px` is a 96-d, 4-block, 3-head
    ViT with 8 px patches at 28 px, not a ViT-S/14. SwiGLU needs the giant entry: its `mlp_layer` cannot
    be written into a JSON config.
    """
    regs = int(cfg.get("n_registers") or 0)
    ffn = cfg.get("ffn_layer") or "mlp"
    dim, depth, heads, patch = (int(cfg[k]) for k in ("embed_dim", "depth", "num_heads", "patch_size"))
    reg = "_reg4" if regs else ""
    for size, shape in _OFFICIAL.items():
        if shape == (dim, depth, heads, ffn) and patch == 14 and regs in (0, 4):
            return f"vit_{size}_patch14{reg}_dinov2"
    builder = f"vit_{'giant' if ffn == 'swiglu' else 'small'}_patch14{reg}_dinov2"
    px = int(cfg.get("img_size") or 0)
    real = f"dinolike_{dim}d_{depth}x{heads}h_patch{patch}" + (f"_{px}px" if px else "")
    real += (f"_reg{regs}" if regs else "") + ("_swiglu" if ffn == "swiglu" else "")
    return f"{builder}.{real}"


def dinolike_to_timm(
    state: Mapping[str, Tensor], cfg: Mapping[str, Any]
) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """(timm state dict, model name, model_args): `timm.create_model(name, pretrained=False, **model_args)`
    then `load_state_dict(state)` rebuilds the backbone (num_classes=0: features, no classifier)."""
    c = dict(cfg)
    sd = {k: v for k, v in state.items() if k != "mask_token"}
    dim, regs = int(c["embed_dim"]), int(c.get("n_registers") or 0)
    swiglu = c.get("ffn_layer") == "swiglu"
    pos = sd.pop("pos_embed")
    grid = square_grid(pos.shape[1] - 1, "pos_embed")
    if regs:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:].clone()
    else:
        sd["pos_embed"] = pos
    if swiglu:
        hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
        for k in [k for k in sd if ".mlp.w12." in k or ".mlp.w3." in k]:
            sd[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = sd.pop(k)
        ratio = mlp_ratio_for(dim, 2 * hidden, swiglu=False)  # SwiGLUPacked: fc1 width = int(dim * ratio)
    else:
        ratio = mlp_ratio_for(dim, sd["blocks.0.mlp.fc1.weight"].shape[0], swiglu=False)
    patch = int(c["patch_size"])
    model_args: dict[str, Any] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": int(c.get("in_chans", 3)),
        "embed_dim": dim,
        "depth": int(c["depth"]),
        "num_heads": int(c["num_heads"]),
        "mlp_ratio": ratio,
        "qkv_bias": bool(c.get("qkv_bias", True)),
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        "num_classes": 0,
    }
    if regs:
        model_args.update(reg_tokens=regs, no_embed_class=True)
    return sd, timm_model_name({**c, "img_size": grid * patch}), model_args


def save_timm(
    out_dir: str | Path, state: Mapping[str, Tensor], cfg: Mapping[str, Any], prep: Preprocessing | None = None
) -> Path:
    """`model.safetensors` (the timm state dict) + `config.json` in timm's Hub layout (`architecture`,
    `model_args`, `pretrained_cfg`), so `timm.create_model("local-dir:DIR", pretrained=True)` works too.
    `prep` (the run's normalisation and crop) fills `pretrained_cfg`, which `resolve_data_config` reads."""
    out_dir = Path(out_dir)
    sd, name, model_args = dinolike_to_timm(state, cfg)
    save_safetensors(sd, out_dir / "model.safetensors")
    if prep is None:
        prep = preprocessing(None, {**cfg, "img_size": model_args["img_size"]})
    size = prep.crop
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": model_args["embed_dim"],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [model_args["in_chans"], size, size],
            "interpolation": "bicubic",
            "crop_pct": prep.crop_pct,
            "crop_mode": "center",
            "mean": list(prep.mean),
            "std": list(prep.std),
            "num_classes": 0,
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def is_timm_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and "architecture" in json.loads(cfg.read_text())


def load_timm(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(official-key state dict, dinolike config) from a timm model directory (config.json + weights)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    args = dict(cfg.get("model_args") or {})
    if (path / "model.safetensors").is_file():
        state = load_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise InteropError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if "num_heads" not in args:  # registered defaults of the dinov2 entries
        base = {"small": 6, "base": 12, "large": 16, "giant": 24}
        size = next((s for s in base if f"vit_{s}_" in cfg.get("architecture", "")), None)
        if size is not None and "embed_dim" not in args:
            args["num_heads"] = base[size]
    return timm_to_dinolike(state, args)
