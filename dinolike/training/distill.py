"""Distillation: a frozen pretrained teacher (backbone + heads) teaches one or several smaller students.

As in the DINOv2 paper: the same DINO + iBOT (+ KoLeo) losses, the teacher is frozen instead of an EMA,
a spare EMA of each student is the model we keep, and stochastic depth is off by default. With
`masking.probability: 0` the iBOT loss is applied to every patch of the two global crops (the paper's
"no masking" variant). Several students share one teacher forward per batch (as in DINOv3), which the
official DINOv2 code cannot do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dinolike.checkpoints.files import load_checkpoint, resolve_checkpoint
from dinolike.models import CheckpointMismatchError, load_state_strict
from dinolike.training.method import Method, Phase, untimed
from dinolike.training.optim import param_groups
from dinolike.training.ssl import SSLTargets, build_student, ssl_loss_terms, teacher_targets


def _teacher_config(path: str | Path) -> tuple[DictConfig, dict, Path]:
    """(config the teacher was trained with, its checkpoint, the resolved file).

    `path` may be a checkpoint file or a run directory (its newest checkpoint). Only pretraining
    checkpoints hold a `teacher`: a distillation checkpoint is refused with a message that says so.
    """
    src = resolve_checkpoint(path, what="distill.teacher")
    ckpt = load_checkpoint(src)
    if "teacher" not in ckpt["model"]:
        raise CheckpointMismatchError(
            f"distill.teacher {src} holds {sorted(ckpt['model'])}, not a pretraining 'teacher'; give the "
            "checkpoint of a `dinolike train` run (a distilled student cannot be a teacher yet)"
        )
    return OmegaConf.create(json.loads(ckpt["config"])), ckpt, src


def student_model_configs(cfg: DictConfig) -> list[DictConfig]:
    """`model` and each `distill.students` delta merged onto it; a key outside `model:` is an error.

    The config loader cannot check the deltas (a list has no schema), so the keys are checked here.
    """
    out = [cfg.model]
    for i, delta in enumerate(cfg.distill.students):
        if not isinstance(delta, DictConfig):
            raise ValueError(f"distill.students[{i}] must be a mapping of model keys, got {delta!r}")
        unknown = sorted(set(delta) - set(cfg.model))
        if unknown:
            raise ValueError(f"distill.students[{i}] has keys {unknown} that are not model.* keys; "
                             f"known: {', '.join(cfg.model)}")
        out.append(OmegaConf.merge(cfg.model, delta))
    return out


def _check_compatible(teacher: nn.Module, student: nn.Module, i: int, teacher_src: Path) -> None:
    """The iBOT loss pairs teacher and student patch tokens one to one: same patch grid, same input."""
    t, s = teacher.patch_embed.proj.weight, student.patch_embed.proj.weight  # [D, C, p, p]
    if t.shape[1:] != s.shape[1:]:
        raise ValueError(
            f"student {i} sees {s.shape[1]}-channel {s.shape[2]}x{s.shape[3]} patches but the teacher "
            f"({teacher_src}) {t.shape[1]}-channel {t.shape[2]}x{t.shape[3]}; set model.patch_size and "
            "model.in_chans to the teacher's"
        )


class DistillMethod(Method):
    """Frozen teacher -> students (`model` + `distill.students`); their EMAs are exported."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        tcfg, ckpt, src = _teacher_config(cfg.distill.teacher)
        # the students predict distributions over the teacher's prototypes: their heads follow its config
        self.cfg = cfg = OmegaConf.merge(cfg, {"heads": tcfg.heads})
        self.teacher = build_student(tcfg)
        load_state_strict(self.teacher, ckpt["model"]["teacher"], what=f"teacher in {src}")
        self.teacher.requires_grad_(False).eval()
        model_cfgs = student_model_configs(cfg)
        self.students = nn.ModuleList(build_student(cfg, m) for m in model_cfgs)
        for i, s in enumerate(self.students):
            _check_compatible(self.teacher["backbone"], s["backbone"], i, src)
        self.student = self.students  # what the loop syncs gradients of
        self.emas = copy.deepcopy(self.students).requires_grad_(False)
        self.targets = SSLTargets(cfg)
        self._model_cfgs = model_cfgs

    def to(self, *args, **kwargs):  # the frozen teacher runs in bf16 on CUDA: half the memory and time
        super().to(*args, **kwargs)
        if next(self.teacher.parameters()).is_cuda and self.cfg.precision.cuda == "bf16":
            self.teacher.to(torch.bfloat16)
        return self

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        groups = []
        for i, s in enumerate(self.students):
            for g in param_groups(s, s["backbone"].n_blocks, o.layerwise_decay, o.patch_embed_lr_mult):
                g["names"] = [f"students.{i}.{n}" for n in g["names"]]
                groups.append(g)
        return groups

    def grad_clip_groups(self) -> list[list[nn.Parameter]]:
        """One gradient-norm clip per student: one student's large gradient must not shrink another's."""
        return [[p for p in s.parameters() if p.requires_grad] for s in self.students]

    def _all_patch_batch(self, batch: dict) -> dict:
        """No masking: iBOT targets on every patch token of the global crops, each crop weighing 1."""
        masks = batch["masks"]  # [2B, N], all False
        n = masks.shape[1]
        return {
            **batch,
            "mask_indices": torch.arange(masks.numel(), device=masks.device),  # [2B * N]
            "masks_weight": torch.full((masks.numel(),), 1.0 / n, device=masks.device),  # [2B * N]
        }

    def forward_loss(self, batch: dict, sched: dict[str, float], phase: Phase = untimed) -> tuple[Tensor, dict]:
        """Sum over students of each one's DINO + iBOT + KoLeo loss against the same teacher targets.

        The students share no parameters, so the gradient of the sum is each student's own gradient.
        """
        if self.cfg.masking.probability == 0:
            batch = self._all_patch_batch(batch)
        with phase("teacher_forward"):  # one teacher pass for every student
            t_out = teacher_targets(self.teacher, self.targets, batch, sched["teacher_temp"],
                                    self.cfg.loss.ibot_weight > 0)
        with phase("student_forward_and_losses"):
            total, metrics = 0.0, {}
            for i, s in enumerate(self.students):
                s.train()
                loss, m = ssl_loss_terms(self.cfg, s, t_out, batch)
                total = total + loss
                prefix = "" if i == 0 else f"student{i}_"
                metrics.update({prefix + k: v for k, v in m.items()})
        metrics["loss"] = total
        return total, metrics

    @torch.no_grad()
    def after_step(self, sched: dict[str, float]) -> None:
        """ema <- m * ema + (1 - m) * student, for every student at once."""
        e = list(self.emas.parameters())
        s = [p.detach() for p in self.students.parameters()]
        torch._foreach_lerp_(e, s, 1.0 - sched["momentum"])

    def kept_backbone(self) -> nn.Module:
        return self.emas[0]["backbone"]

    def extra_backbones(self) -> dict[str, tuple[nn.Module, DictConfig]]:
        """Students beyond the first, exported as `student{i}_backbone.pth` next to the main one."""
        return {f"student{i}": (self.emas[i]["backbone"], self._model_cfgs[i]) for i in range(1, len(self.emas))}

    def sharded_parts(self) -> list[nn.ModuleDict]:
        return [self.teacher, *self.students, *self.emas]

    def checkpointed_parts(self) -> dict[str, nn.Module]:
        return {"students": self.students, "emas": self.emas, "targets": self.targets}
