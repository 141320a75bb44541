"""The teacher export of a run, written by every path that ends or stops one (the end of the schedule, a
signal, the time limit, a finished run started again), all behind the same constant-embeddings check.

The stop paths used to export without the check: a run stopped at iteration 5 of `model.layerscale=1e-5`
left a constant `teacher_backbone.pth`, and when its resume ended refusing an export, the old one stayed
beside it and `dinolike embed RUN` used it. Now a refused export also removes the run's older one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from dinolike import dist
from dinolike.eval.spread import backbone_cls_cosine
from dinolike.training.collapse import CollapseError, CollapseWatch
from dinolike.training.export import export_backbone


def export_names(method: nn.Module, cfg: DictConfig) -> dict[str, tuple[nn.Module, DictConfig]]:
    """The backbones a run exports, by name: the teacher, and a distillation's students."""
    backbones = {"teacher": (method.kept_backbone(), cfg.model)}
    backbones.update(method.extra_backbones())
    return backbones


def export_all(method: nn.Module, cfg: DictConfig, out: Path, env: dist.DistEnv) -> None:
    """Every rank calls (under FSDP the full tensors are gathered to rank 0); rank 0 writes plain,
    unsharded state dicts, and the others wait so that nothing reads the file before it exists."""
    for name, (backbone, model_cfg) in export_names(method, cfg).items():
        plain = method.plain_backbone(backbone, model_cfg, torch.device("cpu"), rank0_only=True)
        if env.is_main:
            export_backbone(plain, model_cfg, out / f"{name}_backbone.pth")
    dist.barrier()


def remove_exports(method: nn.Module, cfg: DictConfig, out: Path, env: dist.DistEnv) -> list[Path]:
    """Delete the run's exports (and their .json sidecars), so that no older backbone is read as this
    run's result; returns the files removed (rank 0)."""
    removed = []
    if env.is_main:
        for name in export_names(method, cfg):
            for path in (out / f"{name}_backbone.pth", out / f"{name}_backbone.pth.json"):
                if path.is_file():
                    path.unlink()
                    removed.append(path)
    dist.barrier()
    return removed


def export_checked(method: nn.Module, cfg: DictConfig, out: Path, env: dist.DistEnv, watch: CollapseWatch,
                   it: int, checkpoint: str) -> None:
    """Export unless the kept backbone gives every image the same embedding (its last logged row, or 32
    probe images, as `dinolike export` checks); then raise CollapseError, the run's older export removed."""
    cosine = backbone_cls_cosine(method.kept_backbone(), cfg.model.in_chans, cfg.crops.global_size)  # every rank
    try:
        watch.final_verdict(it, checkpoint, cosine)
    except CollapseError as e:
        removed = remove_exports(method, cfg, out, env)
        if removed:
            raise CollapseError(f"{e} The run's older export ({', '.join(p.name for p in removed)}) was "
                                "removed, so nothing reads it as this run's result.") from None
        raise
    export_all(method, cfg, out, env)
