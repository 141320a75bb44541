"""One init path for every way a process can be started: alone, by torchrun, or by SLURM/submitit.

torchrun and submitit's `TorchDistributedEnvironment().export()` both set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; a bare `srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which we map
onto the same variables. The two sources are never mixed: torchrun started inside a SLURM allocation
sees both, and its own variables describe the processes that actually exist. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("dinolike.dist")
_host_group: dist.ProcessGroup | None = None  # gloo group for host-side scalars when the default is NCCL


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


def _env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu[007,009-010],cpu01' -> 'gpu007' (no `scontrol` needed)."""
    depth, item = 0, []
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        item.append(ch)
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], "".join(item))


def slurm_port(job_id: int) -> int:
    """Rendezvous port of a SLURM job: fixed per job (every task agrees without talking), different for
    jobs that share a node, and below Linux's ephemeral range (32768+)."""
    return 15000 + job_id % 15000


def launcher() -> str:
    """Who started this process: "torchrun" (also submitit and our own local processes), "slurm" (a
    bare srun) or "single"."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return "slurm"
    return "single"


def _ranks_from_env() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, source) from torchrun/submitit variables, else SLURM's, else 1."""
    source = launcher()
    if source == "torchrun":
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if rank is None or world is None:
            raise ValueError("set both RANK and WORLD_SIZE (torchrun and submitit do), or neither")
        return rank, world, _env_int("LOCAL_RANK", 0), "torchrun"
    if source == "slurm":
        return _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID", 0), "slurm"
    return 0, 1, 0, "single"


def _slurm_rendezvous() -> None:
    """MASTER_ADDR/PORT for a bare `srun` (submitit exports its own): the allocation's first node."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
        multi_node = (_env_int("SLURM_NNODES", 1) or 1) > 1
        os.environ["MASTER_ADDR"] = first_host(nodes) if multi_node and nodes else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = _env_int("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(slurm_port(job) if job is not None else 29500)


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
    rank, world, local, source = _ranks_from_env()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent {source} variables: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local} (need 0 <= RANK < WORLD_SIZE)")
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if source == "slurm":
            _slurm_rendezvous()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
        if rank == 0:
            log.info("process group: %s, %d processes (%s variables)", backend, world, source)
    return DistEnv(rank, world, local, dev)


def current_device() -> torch.device:
    """Where collectives of the default group take their tensors: the current GPU under NCCL, else CPU."""
    if is_enabled() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average tensors over ranks in one flat buffer (the DDP mode's gradient sync), in place.

    extra: a vector summed over ranks in the same buffer (no collective of its own) and returned; None
    without it. In one process: the tensors unchanged, `extra` returned as it is."""
    if not is_enabled():
        return extra
    if not tensors:
        return all_reduce_sum(extra) if extra is not None else None
    dtype = tensors[0].dtype
    parts = [t.reshape(-1) for t in tensors] + ([extra.reshape(-1).to(dtype)] if extra is not None else [])
    flat = torch.cat(parts)  # [sum of numels (+ len(extra))]
    dist.all_reduce(flat)
    n_extra = 0 if extra is None else extra.numel()
    summed = flat[flat.numel() - n_extra:].to(extra.dtype, copy=True) if extra is not None else None  # before /=
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    return summed


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input unchanged); identity in one process."""
    out = values.clone()
    if is_enabled():
        dist.all_reduce(out)
    return out


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order; [obj] in one process."""
    if not is_enabled():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def host_all_reduce_max(values: list[int]) -> list[int]:
    """Element-wise max over ranks of small host integers (flags every rank must agree on), through
    gloo so that it never waits for the GPU stream; identity in one process."""
    if not is_enabled():
        return list(values)
    global _host_group
    if _host_group is None and dist.get_backend() != "gloo":  # first call: every rank is here (collective)
        _host_group = dist.new_group(backend="gloo")
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return [int(v) for v in t]


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
