"""The kept backbone in the official DINOv2 key format, plus a `.json` sidecar with its architecture."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from dinolike.checkpoints.files import RunWriteError, atomic_save


def export_backbone(backbone: nn.Module, model_cfg: Mapping, path: Path) -> Path:
    """Plain state dict (loads into the official `vit_*` with strict=True); the sidecar lets our tools
    rebuild the exact architecture (heads count, registers) without guessing from shapes."""
    from omegaconf import OmegaConf

    sd = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    cfg = {k: v for k, v in cfg.items() if k != "pretrained_weights"}
    sidecar = Path(str(path) + ".json")
    tmp = sidecar.with_name("." + sidecar.name + ".tmp")
    try:
        atomic_save(sd, path)
        tmp.write_text(json.dumps(cfg, indent=2))
        tmp.replace(sidecar)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunWriteError(f"cannot write the backbone export {path}: {e.strerror or e}; the checkpoints are "
                            "intact: make room and run the same command again to export it") from None
    return path
