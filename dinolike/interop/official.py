"""Official DINOv2 files into dinolike models, strictly: hub backbones, FSDP-chunked keys, the training
`teacher_checkpoint.pth` (with its heads), and anything `dinolike export` writes.

Why strict: the official code loads with strict=False, so a typo or a wrong architecture silently yields a
half-random network; here every missing, unexpected or mis-shaped key is named in one error.
The hub's register models resize positions to the exact grid with antialias (no +0.1 offset) and the
others use DINOv2's offset trick; `official_backbone_cfg` records which, so tokens match at any size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dinolike.checkpoints.dcp import is_dcp_checkpoint
from dinolike.checkpoints.files import list_checkpoints, load_checkpoint
from dinolike.interop.common import (
    InteropError,
    load_safetensors,
    mlp_ratio_for,
    resize_pos_embed,
    square_grid,
)
from dinolike.models import VisionTransformer, build_backbone
from dinolike.models.load import (
    CheckpointMismatchError,
    backbone_state_and_cfg,
    infer_backbone_cfg,
    load_state_strict,
    normalize_backbone_keys,
    read_checkpoint,
    training_backbone,
)

_HEAD_RENAMES = {  # torch.nn.utils.parametrizations.weight_norm spelling -> the classic one we use
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}


def official_backbone_cfg(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Explicit config of an official-key backbone from its shapes (heads = dim / 64 as in every DINOv2
    model), with the hub's interpolation: register models exact-size + antialias, others offset 0.1."""
    cfg = infer_backbone_cfg(state)
    dim = cfg["embed_dim"]
    if cfg["ffn_layer"] == "swiglu":  # the fused w12 hides the ratio; recover one that rebuilds w3's width
        cfg["mlp_ratio"] = mlp_ratio_for(dim, state["blocks.0.mlp.w3.weight"].shape[1], swiglu=True)
    else:
        cfg["mlp_ratio"] = mlp_ratio_for(dim, state["blocks.0.mlp.fc1.weight"].shape[0], swiglu=False)
    cfg["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    regs = cfg["n_registers"] > 0
    cfg.update(arch="custom", interpolate_offset=0.0 if regs else 0.1, interpolate_antialias=regs)
    return cfg


def _is_hf_keys(state: Mapping[str, Any]) -> bool:
    return any(
        re.match(r"^(dinov2\.|dinov2_with_registers\.)?(embeddings\.|encoder\.layer\.)", k) for k in state
    )


def read_backbone(
    path: str | Path, which: str = "teacher"
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(official-key backbone state dict, model config or None) from any file or directory we know.

    Accepted: a dinolike training checkpoint (`which` = teacher | student), an exported backbone (+ `.json`
    sidecar), an official hub `.pth` (plain, `module.`/`backbone.` prefixes or FSDP `blocks.C.N.`), an
    official `teacher_checkpoint.pth`, `dinolike export --format hf|timm` directories (or any HF / timm
    DINOv2 directory with config.json + weights) and run folders (their `teacher_backbone.pth`, or the
    newest checkpoint for the student). The config is None only for bare official files.
    """
    from dinolike.interop import hf, timm

    path = Path(path)
    if is_dcp_checkpoint(path):  # a sharded (DCP) training checkpoint: the full model, read in this process
        return training_backbone(load_checkpoint(path), path, which)
    if path.is_dir():
        if hf.is_hf_dir(path):
            return hf.load_hf(path)
        if timm.is_timm_dir(path):
            return timm.load_timm(path)
        newest = list_checkpoints(path / "checkpoints")[-1:]  # a run folder's newest checkpoint (file or DCP)
        exported = [path / n for n in ("backbone.pth", "teacher_backbone.pth") if (path / n).is_file()]
        # a run folder: its exported teacher; the student (or a run stopped before its export) from the checkpoint
        order = [*newest, *exported] if which == "student" else [*exported, *newest]
        if order:
            return read_backbone(order[0], which)
        raise InteropError(f"{path} is a directory but not a run folder, a Hugging Face / timm model or a "
                           "dinolike export")
    if path.suffix == ".safetensors":
        state: Mapping[str, Tensor] = load_safetensors(path)
        cfg_file = path.parent / "config.json"
        if _is_hf_keys(state):
            if not cfg_file.is_file():
                raise InteropError(f"{path} holds Hugging Face keys but there is no config.json beside it")
            return hf.hf_to_dinolike(state, json.loads(cfg_file.read_text()))
        if "reg_token" in state or (
            cfg_file.is_file() and "architecture" in json.loads(cfg_file.read_text())
        ):
            return timm.load_timm(path.parent) if cfg_file.is_file() else timm.timm_to_dinolike(state)
        return normalize_backbone_keys(state), None
    state, cfg = backbone_state_and_cfg(path, which)
    if _is_hf_keys(state):
        raise InteropError(f"{path} holds Hugging Face keys: pass the model directory (with config.json)")
    if "reg_token" in state:  # a timm register model saved with torch.save
        return timm.timm_to_dinolike(state, None)
    return state, cfg


def read_backbone_with_cfg(
    path: str | Path, which: str = "teacher"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`read_backbone`, with the config inferred from the shapes when the file carries none."""
    state, cfg = read_backbone(path, which)
    if cfg is None:
        cfg = official_backbone_cfg(state)
    return state, cfg


def load_pretrained(
    path: str | Path, model_cfg: Mapping[str, Any] | None = None, which: str = "teacher"
) -> tuple[VisionTransformer, dict[str, Any]]:
    """(model, model config) from a checkpoint; strict: a mismatch lists the offending keys.

    The config comes from (in order): the checkpoint itself (training checkpoints), `model_cfg`, a
    `.json` sidecar written by `dinolike export`, or the tensor shapes (official hub files).
    """
    state, cfg = read_backbone(path, which)
    if model_cfg is not None and cfg is None:
        cfg = dict(model_cfg)
    if cfg is None:
        cfg = {**official_backbone_cfg(state), "arch": "custom"}
    model = build_backbone(cfg, drop_path=False)
    load_state_strict(model, state, what=f"backbone in {path}")
    return model.eval(), dict(cfg)


def fit_pos_embed(backbone: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Resize the checkpoint's position grid to the backbone's (bicubic, exact size, the backbone's own
    antialias setting) when only the grid differs; anything else is left for the strict load to report."""
    own = backbone.state_dict().get("pos_embed")
    pos = state.get("pos_embed")
    if own is None or pos is None or pos.shape == own.shape or pos.shape[-1] != own.shape[-1]:
        return state
    grid = square_grid(own.shape[1] - 1, "the model's pos_embed")
    square_grid(pos.shape[1] - 1, "the checkpoint's pos_embed")
    out = dict(state)
    out["pos_embed"] = resize_pos_embed(
        pos, grid, antialias=bool(getattr(backbone, "interpolate_antialias", False))
    )
    return out


def load_backbone_weights(backbone: nn.Module, path: str | Path, which: str = "teacher") -> None:
    """Load any supported backbone file into `backbone` (continued pretraining: `model.pretrained_weights`).

    Strict: a missing, unexpected or mis-shaped key raises CheckpointMismatchError naming it; a different
    position grid (e.g. a 518 px hub model into a 224 px run) is resized bicubically first. timm files have
    no mask token: a zero one (DINOv2's init) is used.
    """
    state, _ = read_backbone(path, which)
    state = fit_pos_embed(backbone, state)
    load_state_strict(backbone, state, what=f"backbone in {path}")


@dataclass
class TeacherCheckpoint:
    """The parts of an official `teacher_checkpoint.pth`: backbone (official keys), heads (DINOHead keys)."""

    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def head_config(self) -> dict[str, Any]:
        """`heads:` config values that rebuild these heads (so a user can check or set them)."""
        dino = self.heads.get("dino_head")
        if dino is None:
            raise InteropError("the checkpoint has no dino_head")
        cfg = head_config_from_state(dino)
        cfg["ibot_separate_head"] = "ibot_head" in self.heads
        cfg["ibot_out_dim"] = (
            head_config_from_state(self.heads["ibot_head"])["out_dim"]
            if "ibot_head" in self.heads
            else cfg["out_dim"]
        )
        return cfg


def head_config_from_state(state: Mapping[str, Tensor]) -> dict[str, int]:
    """(out_dim, hidden_dim, bottleneck_dim, nlayers) of a DINOHead state dict."""
    if "last_layer.weight_v" not in state:
        raise InteropError(f"not a DINO head state dict (keys: {', '.join(sorted(state)[:6])})")
    linear = sorted(int(m.group(1)) for k in state if (m := re.match(r"mlp\.(\d+)\.weight$", k)))
    if not linear:
        raise InteropError("DINO head state dict has no mlp.N.weight layers")
    v = state["last_layer.weight_v"]  # [K, bottleneck]
    return {
        "out_dim": v.shape[0],
        "hidden_dim": state[f"mlp.{linear[0]}.weight"].shape[0] if len(linear) > 1 else 2048,
        "bottleneck_dim": v.shape[1],
        "nlayers": len(linear),
    }


def read_teacher_checkpoint(path: str | Path) -> TeacherCheckpoint:
    """Backbone and head state dicts of an official `teacher_checkpoint.pth` (`teacher` dict with
    `backbone.` / `dino_head.` / `ibot_head.` prefixes, possibly FSDP-chunked or `module.`-prefixed)."""
    ckpt = read_checkpoint(path)
    teacher = ckpt.get("teacher") if isinstance(ckpt, dict) else None
    if not isinstance(teacher, dict):
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InteropError(f"{path} is not an official teacher checkpoint (no 'teacher' dict; it has {keys})")
    backbone: dict[str, Tensor] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    other = []
    for k, v in teacher.items():
        k = re.sub(r"^module\.", "", k)
        head, _, rest = k.partition(".")
        if head == "backbone":
            backbone[k] = v
        elif head in ("dino_head", "ibot_head"):
            heads.setdefault(head, {})[_HEAD_RENAMES.get(rest, rest)] = v
        else:
            other.append(k)
    if other:
        raise InteropError(
            f"{path}: teacher keys outside backbone/dino_head/ibot_head: {', '.join(sorted(other)[:8])}"
        )
    if not backbone:
        raise InteropError(f"{path}: the teacher dict has no backbone.* keys")
    return TeacherCheckpoint(normalize_backbone_keys(backbone), heads)


def load_teacher_checkpoint(model: nn.ModuleDict, path: str | Path) -> TeacherCheckpoint:
    """Load backbone *and heads* of an official teacher checkpoint into a `build_student` ModuleDict
    (keys `backbone`, `dino_head`, optional `ibot_head`), strictly; the heads must match `heads:` exactly
    (`TeacherCheckpoint.head_config()` says what to set)."""
    parts = read_teacher_checkpoint(path)
    wanted = sorted(k for k in ("dino_head", "ibot_head") if k in model)
    if sorted(parts.heads) != wanted:
        raise InteropError(
            f"{path} has heads {sorted(parts.heads)} but the model has {wanted}; set "
            f"heads.ibot_separate_head={'true' if 'ibot_head' in parts.heads else 'false'}"
        )
    load_state_strict(
        model["backbone"], fit_pos_embed(model["backbone"], parts.backbone), what=f"backbone in {path}"
    )
    for name in wanted:
        try:
            load_state_strict(model[name], parts.heads[name], what=f"{name} in {path}")
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(
                f"{e}; the checkpoint's heads need heads: {parts.head_config()}"
            ) from None
    return parts
