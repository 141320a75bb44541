"""Sharded checkpoints of FSDP2 runs with `torch.distributed.checkpoint` (DCP): a folder per checkpoint.

Why: the single-file checkpoint gathers the full state to rank 0 (ViT-g: ~20 GB of host memory at every
save) and every rank reads and hashes the whole file on resume. Here each rank writes and reads only its
own shards, and DCP reshards on load, so a run saved by N processes resumes in M.

    checkpoints/ckpt_0001000/      (written as .ckpt_0001000.tmp/, renamed when complete)
      __R_0.distcp                 rank R's shards (DCP's FileSystemWriter)
      .metadata                    DCP's map of tensors to files and byte ranges
      meta.pt                      iteration, config, RNG states, skip counts (torch.save, weights_only)
      manifest.json                size and SHA-256 of every file above: the integrity check

Same guarantees as the single file (files.py): NaN/inf weights are refused before anything is
written; a kill at any moment leaves only a temp folder, which resume ignores and rank 0 removes; the
manifest is the last file written before the rename; the last `keep_last` checkpoints are kept; resume
walks back past a checkpoint whose files are missing, cut short or fail their hash.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinolike import dist
from dinolike.checkpoints.atomic import CheckpointWriteError, NonFiniteStateError, atomic_save
from dinolike.hashing import file_hash

MANIFEST, META = "manifest.json", "meta.pt"


def is_dcp_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def temp_dir(final: Path) -> Path:
    """The same name on every rank, so that all write into one folder (a shared filesystem)."""
    return final.with_name(f".{final.name}.tmp")


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _non_finite(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of this rank's floating-point shards holding NaN/inf."""
    bad = []
    for k, v in tree.items():
        if isinstance(v, dict):
            bad += _non_finite(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            x = _local(v)
            if x.is_floating_point() and x.numel() and not torch.isfinite(x).all():
                bad.append(f"{prefix}{k}")
    return bad


def sharded_state(method: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model parts and optimizer as DCP sees them: each rank's own shards (DTensors), no gather."""
    state: dict[str, Any] = {"model": {k: get_model_state_dict(v) for k, v in method.checkpointed_parts().items()}}
    if opt is not None:
        state["optimizer"] = get_optimizer_state_dict(method.student, opt)
    return state


def save_sharded(final: Path, method: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Collective: every rank writes its shards into the temp folder, hashes what it wrote; rank 0 writes
    meta.pt and the manifest, then renames the folder into place. Raises NonFiniteStateError (nothing
    written) or CheckpointWriteError (the previous checkpoint untouched)."""
    rank = torch.distributed.get_rank() if dist.is_enabled() else 0
    state = sharded_state(method, opt)
    bad = _non_finite(state["model"], "model.")
    if dist.host_all_reduce_max([int(bool(bad))])[0]:  # every rank refuses together
        raise NonFiniteStateError(f"refused to checkpoint {final.name}: {bad[0] if bad else 'a shard of another rank'}"
                                  " holds NaN/inf; the previous checkpoint stays the newest")
    tmp = temp_dir(final)
    error = ""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never mixed with this write
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=True))
        if rank == 0:
            atomic_save(meta, tmp / META)
        mine = sorted(p for p in tmp.iterdir() if p.name.startswith(f"__{rank}_") or
                      (rank == 0 and p.name in (".metadata", META)))
        files = {p.name: {"size": p.stat().st_size, "sha256": file_hash(p)} for p in mine}
    except OSError as e:
        error, files = f"{e.strerror or e}", {}
    gathered = dist.all_gather_objects((files, error))
    errors = [e for _, e in gathered if e]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {errors[0]}; the previous one is intact")
    if rank == 0:
        manifest = {"iteration": meta["iteration"], "world_size": len(gathered),
                    "files": {k: v for f, _ in gathered for k, v in f.items()}}
        _write_manifest(tmp, manifest)
        os.replace(tmp, final)
    dist.barrier()


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The last file of a checkpoint folder (fsynced): its presence means every shard is on disk."""
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(path: Path) -> str | None:
    """Why `path` is not an intact DCP checkpoint, or None. Sizes are checked on every rank; the hashes
    are split across ranks (rank R's file `__R_0.distcp` by rank R % world, the small ones by rank 0), so
    each rank reads ~1/world of the checkpoint, at an unchanged world size the file it then loads (a
    page-cache hit), and the verdict is agreed (collective when distributed: every rank must call)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"unreadable manifest ({type(e).__name__}: {e})"
        files = None
    if files is not None:
        why = None
        on = dist.is_enabled()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if on else (0, 1)
        for name, want in sorted(files.items()):
            p = path / name
            if not p.is_file():
                why = f"{name} is missing"
            elif p.stat().st_size != want["size"]:
                why = f"{name} is {p.stat().st_size} bytes, the manifest says {want['size']}"
            elif _owner(name, world) == rank and file_hash(p) != want["sha256"]:
                why = f"{name} fails its SHA-256: damaged after it was written"
            if why:
                break
    verdicts = dist.all_gather_objects(why)
    return next((v for v in verdicts if v), None)


def _owner(name: str, world: int) -> int:
    """The rank that hashes file `name` on load: the writer's rank modulo the world, rank 0 for the rest."""
    writer = name[2:].partition("_")[0] if name.startswith("__") else ""
    return int(writer) % world if writer.isdigit() else 0


def read_meta(path: Path) -> dict[str, Any]:
    """meta.pt of a verified checkpoint folder, marked as DCP (the loop then loads the shards itself)."""
    meta = torch.load(path / META, map_location="cpu", weights_only=True)
    return {**meta, "format": "dcp", "path": str(path)}


def load_sharded(path: Path, method: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    """Each rank reads only what its shards need (DCP reshards from any saved world size)."""
    state = sharded_state(method, opt)
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_enabled())
    for name, module in method.checkpointed_parts().items():
        set_model_state_dict(module, state["model"][name], options=StateDictOptions(strict=True))
    if opt is not None:
        set_optimizer_state_dict(method.student, opt, state["optimizer"])


def read_full_model(path: Path, parts: tuple[str, ...] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Full (unsharded) tensors of the model parts, in this process alone: for the export, distillation's
    teacher and the tools. Templates are built from DCP's metadata, so only the parts asked for are read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    md = reader.read_metadata()
    template: dict[str, Any] = {"model": {}}
    for fqn, item in md.state_dict_metadata.items():
        part, _, key = fqn.removeprefix("model.").partition(".")
        if not fqn.startswith("model.") or not isinstance(item, TensorStorageMetadata):
            continue
        if parts is None or part in parts:
            template["model"].setdefault(part, {})[key] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(template, storage_reader=reader, no_dist=True)
    return template["model"]
