"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student and the teacher, block by block, and
world-size-independent state dicts through `torch.distributed.checkpoint.state_dict`.

Only public APIs: the EMA update in the methods is a `_foreach_lerp_` over the parameters, which under
FSDP2 are DTensors whose local shards line up between student and teacher because both are sharded the
same way; no flat-parameter internals (what broke the official code on torch >= 2.1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinolike import dist

# Backbone entry points other than forward(): FSDP2 unshards a module's own parameters (patch embed,
# pos embed, norms) in a hook on forward() only, so these must be registered to get the same hooks.
FORWARD_METHODS = ("forward_features", "get_intermediate_layers")


def shard(parts: list[nn.ModuleDict], device: torch.device, world_size: int, bf16: bool) -> None:
    """Each block, each head, then each backbone is its own FSDP unit: one all-gather per block."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mesh": mesh} | ({"mp_policy": policy} if policy is not None else {})
    for part in parts:
        for blk in part["backbone"].blocks:
            fully_shard(blk, **kw)
        for module in part.values():
            fully_shard(module, **kw)
        for name in FORWARD_METHODS:
            if hasattr(part["backbone"], name):
                register_fsdp_forward_method(part["backbone"], name)


def reshard(module: nn.Module) -> None:
    """Free the unsharded parameters that forward left behind: FSDP2 keeps a root's parameters
    unsharded after forward (backward would gather them again), but the teacher has no backward, so
    its backbone root and whole heads would stay gathered, and the EMA would mix full tensors with shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def unsharded_copy(module: nn.Module, build: Callable[[], nn.Module], device: torch.device,
                   rank0_only: bool = False) -> nn.Module | None:
    """A plain (unsharded, fp32) copy of an FSDP module, built by `build()` on `device`.

    Why: forwards of a sharded module are collectives, so code that runs a different number of batches
    per rank (feature extraction over a dataset split by rank) or on one rank only (export) needs a copy.
    Collective: every rank must call. With rank0_only the full tensors are gathered to rank 0 (in CPU
    memory) and the other ranks get None.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(module, options=opts)
    if rank0_only and torch.distributed.get_rank() != 0:
        return None
    copy = build().to(device)
    copy.load_state_dict(state, strict=True)
    return copy.train(module.training)


def _options(**kw) -> StateDictOptions:
    # full (unsharded) tensors gathered to rank 0: a checkpoint saved by N processes loads with M
    if dist.is_enabled():
        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)
    return StateDictOptions(**kw)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(module, options=_options())


def optim_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(module, opt, options=_options())


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, state, options=_options(strict=True))


def load_optim_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, opt, state, options=_options())
