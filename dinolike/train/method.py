"""What the training loop needs from a method, and the parts every method shares."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinolike import dist


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
    def prepare_distributed(self, env: dist.DistEnv) -> None:
        """Every rank starts from rank 0's weights (the DDP mode then keeps them equal)."""
        self._env = env
        if env.enabled:
            import torch.distributed as tdist

            for p in self.state_dict().values():
                tdist.broadcast(p, src=0)

    def sync_gradients(self) -> None:
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        dist.all_reduce_mean_(grads)

    @staticmethod
    def to_device(batch: dict, device: torch.device) -> dict:
        nb = device.type == "cuda"
        return {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def periodic_eval(self, it: int, cfg: DictConfig, env: dist.DistEnv) -> dict[str, float]:
        """Every `eval.knn_every` iterations: kNN top-1 of the kept backbone on a small labelled set."""
        e = cfg.eval
        if not e.knn_every or it % e.knn_every or not e.knn_train or not e.knn_val:
            return {}
        from dinolike.train.periodic_eval import periodic_knn

        return periodic_knn(self.kept_backbone(), cfg, env)
