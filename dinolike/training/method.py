"""What the training loop needs from a method, and the parts every method shares.

The contract is explicit: every hook the loop, the step or the bench calls is defined here, with the
default a method gets when it has nothing special to do (one gradient-clip group, no extra backbones).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinolike import dist

log = logging.getLogger("dinolike.train")

# A phase of the step by name -> a context that times it: the bench passes timers, training passes `untimed`.
Phase = Callable[[str], AbstractContextManager]


def untimed(name: str) -> AbstractContextManager:
    """The phase context of an untimed step: nothing happens around the phase."""
    return contextlib.nullcontext()


class Method(nn.Module):
    """Subclasses set `self.cfg` and `self.student` (trained) and implement `param_groups`,
    `forward_loss`, `after_step`, `kept_backbone`, `sharded_parts` and `checkpointed_parts`."""

    cfg: DictConfig
    student: nn.Module
    strategy: str = "none"  # none | ddp | fsdp, set by prepare_distributed
    _grad_all_reduce: bool = False  # DDP: average gradients over ranks after backward

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def forward_loss(self, batch: dict, sched: dict[str, float],
                     phase: Phase = untimed) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, metrics) of one batch; the teacher and the student part each run inside `phase(...)`
        ("teacher_forward", "student_forward_and_losses"), so the bench can time them apart."""
        raise NotImplementedError

    def after_step(self, sched: dict[str, float]) -> None:
        raise NotImplementedError

    def kept_backbone(self) -> nn.Module:
        raise NotImplementedError

    def checkpointed_parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def grad_clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately. Default: one group, every
        parameter the optimizer steps, in its order."""
        return [[p for g in self.param_groups() for p in g["params"]]]

    def extra_backbones(self) -> dict[str, tuple[nn.Module, DictConfig]]:
        """Backbones exported next to the kept one, as `{name}_backbone.pth`: name -> (module, model config)."""
        return {}

    # ---- shared -------------------------------------------------------------------------------
    def sharded_parts(self) -> list[nn.ModuleDict]:
        """The backbone+heads dicts FSDP shards (student and teacher alike, so EMA shards line up)."""
        raise NotImplementedError

    def prepare_distributed(self, env: dist.DistEnv) -> None:
        """Pick the strategy: none (one process), ddp (replicas + gradient all-reduce) or fsdp (FSDP2).

        `auto` is FSDP on several GPUs and DDP on CPU processes. Every rank first takes rank 0's
        initial weights, so replicas (and shards) start from the same model.
        """
        d = self.cfg.dist
        if d.activation_checkpointing:
            for part in self.sharded_parts():
                part["backbone"].set_activation_checkpointing(d.activation_checkpointing_scope)
        strategy = d.strategy
        if strategy == "auto":
            strategy = "none" if not env.enabled else ("fsdp" if env.device.type == "cuda" else "ddp")
        if strategy not in ("none", "ddp", "fsdp"):
            raise ValueError(f"dist.strategy must be auto, ddp or fsdp, got {strategy!r}")
        if env.enabled:
            import torch.distributed as tdist

            for p in self.state_dict().values():
                tdist.broadcast(p, src=0)
        if strategy == "fsdp" and env.enabled:
            from dinolike import fsdp

            bf16 = env.device.type == "cuda" and self.cfg.precision.cuda == "bf16"
            fsdp.shard(self.sharded_parts(), env.device, env.world_size, bf16)
        self._grad_all_reduce = strategy == "ddp" and env.enabled
        self.strategy = strategy if env.enabled else "none"
        if env.is_main:
            log.info("distributed: world_size=%d strategy=%s device=%s", env.world_size, self.strategy,
                     env.device)

    def sync_gradients(self, extra: Tensor | None = None) -> Tensor | None:
        """After backward. DDP mode: average gradients over ranks. FSDP mode: gradients are already
        reduce-scattered; reshard what forward left gathered (teacher), before the step and the EMA.

        extra: a small float vector (the step's metrics, for the finite check) to sum over ranks; returned
        summed. DDP mode carries it in the gradient all-reduce, so the check costs no collective of its own
        (each collective is a point where ranks wait for each other: 2 % of the CPU main job's step)."""
        summed = None
        if self._grad_all_reduce:
            grads = [p.grad for p in self.student.parameters() if p.grad is not None]
            summed = dist.all_reduce_mean_(grads, extra)
        elif extra is not None:
            summed = dist.all_reduce_sum(extra)
        if self.strategy == "fsdp":
            from dinolike import fsdp

            for part in self.sharded_parts():
                fsdp.reshard(part)
        return summed

    @staticmethod
    def to_device(batch: dict, device: torch.device) -> dict:
        """The batch on `device`; a tensor under two keys (the teacher's global crops are the student's)
        is copied once and stays one tensor."""
        nb = device.type == "cuda"
        moved: dict[int, Tensor] = {}
        out = {}
        for k, v in batch.items():
            if isinstance(v, Tensor):
                if id(v) not in moved:
                    moved[id(v)] = v.to(device, non_blocking=nb)
                v = moved[id(v)]
            out[k] = v
        return out

    def plain_backbone(self, backbone: nn.Module, model_cfg: DictConfig, device: torch.device,
                       rank0_only: bool = False) -> nn.Module | None:
        """`backbone` itself, or under FSDP an unsharded copy (collective; None off rank 0 when
        rank0_only): for code that runs it unevenly across ranks (feature extraction, export)."""
        from dinolike import fsdp
        from dinolike.models import build_backbone

        if not fsdp.is_sharded(backbone):
            return backbone
        return fsdp.unsharded_copy(backbone, lambda: build_backbone(model_cfg), device, rank0_only)

    def periodic_eval(self, it: int, cfg: DictConfig, env: dist.DistEnv) -> dict[str, float]:
        """Every `eval.knn_every` iterations: kNN top-1 of the kept backbone on a small labelled set.
        Every rank must call: the features are extracted on all ranks (each a slice) and all-gathered."""
        e = cfg.eval
        if not e.knn_every or it % e.knn_every or not e.knn_train or not e.knn_val:
            return {}
        from dinolike.training.periodic_eval import periodic_knn

        return periodic_knn(self.plain_backbone(self.kept_backbone(), cfg.model, env.device), cfg, env)
