"""Load backbone weights from any checkpoint we know, strictly.

Formats: a dinolike training checkpoint (`checkpoints/*.pt`, holds its own config), a backbone file in the
official DINOv2 key format (our export or the hub `.pth`), and the official training
`teacher_checkpoint.pth` (`teacher` dict with `backbone.` prefixes). The official code loads with
strict=False and silently evaluates a half-random model on a typo; here a missing, unexpected or
mis-shaped key is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinolike.errors import DinolikeError


class CheckpointMismatchError(DinolikeError, RuntimeError):
    """Raised when a state dict does not fit the model; the message lists the offending keys."""


def _short(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)`, but with one readable error that lists every problem."""
    check_state(module, state, what)
    module.load_state_dict(state, strict=True)


def check_state(module: nn.Module, state: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected or mis-shaped key (sharded
    parameters report their global shape, so this also checks FSDP modules against full state dicts)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_short(shapes)}")
    if problems:
        raise CheckpointMismatchError(f"{what} does not match the model; " + "; ".join(problems))


def normalize_backbone_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official variants to plain backbone keys: drops `module.`/`backbone.` prefixes and turns FSDP's
    chunked `blocks.C.N.` into `blocks.N.`."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        k = re.sub(r"^(module\.)?(backbone\.)?", "", k)
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        out[k] = v
    return out


def infer_backbone_cfg(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture from tensor shapes; heads default to dim / 64 (true of every official DINOv2 model)."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointMismatchError(
            "not a ViT backbone state dict: no `patch_embed.proj.weight` / `pos_embed` "
            f"(first keys: {_short(sorted(state), 6)})"
        )
    w = state["patch_embed.proj.weight"]  # [D, C, p, p]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_reg = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        mlp_ratio = 4.0  # the fused SwiGLU hides its ratio; every official SwiGLU model uses 4
    else:
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    return {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": max(dim // 64, 1),
        "patch_size": patch,
        "in_chans": in_chans,
        "img_size": grid * patch,
        "n_registers": n_reg,
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "mlp_ratio": mlp_ratio,
        "layerscale": 1e-5 if "blocks.0.ls1.gamma" in state else None,
    }


def state_leaves(obj: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) pairs of a nested state in a canonical order: dict keys sorted, lists and tuples
    alike (the weights-only loader may give back a list where a tuple was saved)."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from state_leaves(obj[k], f"{name}.{k}" if name else str(k))
    elif isinstance(obj, list | tuple) and all(isinstance(v, int | float | str | bool) for v in obj):
        yield name, list(obj)  # e.g. an RNG state, 625 integers: one leaf, not 625
    elif isinstance(obj, list | tuple):
        yield f"{name}#len", len(obj)
        for i, v in enumerate(obj):
            yield from state_leaves(v, f"{name}.{i}")
    else:
        yield name, obj


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor and the repr of every other value of a
    training checkpoint (its `checksum` entry excluded). torch.load does not notice a flipped byte inside
    a tensor, it returns the wrong number: this does."""
    h = hashlib.sha256()
    for name, leaf in state_leaves({k: v for k, v in state.items() if k != "checksum"}):
        if isinstance(leaf, Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, any dtype (bf16 too)
        else:
            h.update(f"{name}={type(leaf).__name__}:{leaf!r};".encode())
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True and an error that says what went wrong with the file; a training
    checkpoint's checksum is verified."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(ckpt, dict) and "checksum" in ckpt and ckpt["checksum"] != state_checksum(ckpt):
        raise CheckpointMismatchError(f"{path} fails its checksum: the file was damaged after it was written")
    return ckpt


def training_backbone(ckpt: dict[str, Any], path: str | Path, which: str = "teacher") -> tuple[dict[str, Tensor], dict]:
    """(backbone state dict, model config) of a loaded dinolike training checkpoint (a file or a DCP folder)."""
    parts = ckpt["model"]
    if "emas" in parts:  # distillation: the kept model is the EMA of the first student
        prefix, part = "0.backbone.", parts["emas" if which == "teacher" else "students"]
    elif which in parts:
        prefix, part = "backbone.", parts[which]
    else:
        raise CheckpointMismatchError(f"{path} has no '{which}' model; it has {sorted(parts)}")
    sd = {k[len(prefix) :]: v for k, v in part.items() if k.startswith(prefix)}
    return sd, json.loads(ckpt["config"])["model"]


def backbone_state_and_cfg(path: str | Path, which: str = "teacher") -> tuple[dict[str, Tensor], dict | None]:
    """(backbone state dict, model config or None) from any supported checkpoint file."""
    ckpt = read_checkpoint(path)
    cfg = None
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:  # dinolike training checkpoint
        return training_backbone(ckpt, path, which)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("teacher"), dict):  # official teacher_checkpoint.pth
        ckpt = {k: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    sidecar = Path(str(path) + ".json")
    if sidecar.is_file():  # written by our export next to the weights
        cfg = json.loads(sidecar.read_text())
    return normalize_backbone_keys(ckpt), cfg
