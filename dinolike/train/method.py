"""What the training loop needs from a method, and the parts every method shares."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinolike import dist

log = logging.getLogger("dinolike.train")


class Method(nn.Module):
    """Subclasses set `self.student` (trained) and implement `forward_loss`, `after_step`,
    `kept_backbone` and `checkpointed_parts`."""

    cfg: DictConfig
    student: nn.Module

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def forward_loss(self, batch: dict, sched: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_step(self, sched: dict[str, float]) -> None:
        raise NotImplementedError

    def kept_backbone(self) -> nn.Module:
        raise NotImplementedError

    def checkpointed_parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

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
                part["backbone"].grad_checkpointing = True
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

            bf16 = env.device.type == "cuda" and d.mixed_precision == "bf16"
            fsdp.shard(self.sharded_parts(), env.device, env.world_size, bf16)
        self._grad_all_reduce = strategy == "ddp" and env.enabled
        self.strategy = strategy if env.enabled else "none"
        if env.is_main:
            log.info("distributed: world_size=%d strategy=%s device=%s", env.world_size, self.strategy,
                     env.device)

    def sync_gradients(self) -> None:
        """After backward. DDP mode: average gradients over ranks. FSDP mode: gradients are already
        reduce-scattered; reshard what forward left gathered (teacher), before the step and the EMA."""
        if getattr(self, "_grad_all_reduce", False):
            grads = [p.grad for p in self.student.parameters() if p.grad is not None]
            dist.all_reduce_mean_(grads)
        if getattr(self, "strategy", "none") == "fsdp":
            from dinolike import fsdp

            for part in self.sharded_parts():
                fsdp.reshard(part)

    @staticmethod
    def to_device(batch: dict, device: torch.device) -> dict:
        nb = device.type == "cuda"
        return {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in batch.items()}

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
        from dinolike.train.periodic_eval import periodic_knn

        return periodic_knn(self.plain_backbone(self.kept_backbone(), cfg.model, env.device), cfg, env)
