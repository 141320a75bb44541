"""One init path for every way a process can be started: alone, by torchrun, or by SLURM/submitit.

torchrun and submitit's `TorchDistributedEnvironment().export()` both set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; a bare `srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which we map
onto the same variables. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n) not in (None, ""):
            return int(os.environ[n])
    return None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"run.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Initialise the process group when the environment says there are several processes."""
    world = _env_int("WORLD_SIZE") or _env_int("SLURM_NTASKS") or 1
    rank = _env_int("RANK") if _env_int("RANK") is not None else (_env_int("SLURM_PROCID") or 0)
    local = _env_int("LOCAL_RANK") if _env_int("LOCAL_RANK") is not None else (_env_int("SLURM_LOCALID") or 0)
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in one flat buffer (the DDP mode's gradient sync)."""
    if not is_enabled() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
