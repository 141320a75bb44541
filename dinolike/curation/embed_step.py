"""Step 1, `embed`: run an embedder over the pool, reference and seed images into fixed-size shards.

The item list of each set is written once (`prepare_sets`); shard `i` then depends only on that list and
the embedder, so shards can run in any order, in parallel (a SLURM job array through submitit) or in a
local loop, and a crashed or preempted run resumes by skipping every shard whose marker exists.
Unreadable images are counted in the shard marker and left out of the shard.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinolike.data.datasets import build_dataset, load_image

from .config import section_fingerprint
from .embedders import Embedder, build_embedder
from .store import ShardSet, StepOutputError, atomic_write, read_lines, write_lines

__all__ = ["SETS", "set_specs", "shard_set", "prepare_sets", "embed_shard", "pending_shards", "run_embed",
           "submit_embed", "array_tasks", "shard_items", "load_set"]

log = logging.getLogger(__name__)
SETS = ("pool", "references", "seeds")


def _as_cfg(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def set_specs(cfg: DictConfig, name: str) -> list[str]:
    specs = cfg[name]
    return [specs] if isinstance(specs, str) else [str(s) for s in specs]


def shard_set(cfg: DictConfig, name: str) -> ShardSet:
    return ShardSet(Path(cfg.work_dir) / "embeddings" / name)


def _list_items(specs: list[str], is_pool: bool) -> list[str]:
    """Lines `spec_index<TAB>item_index<TAB>label<TAB>name` in a fixed order (specs in order, then each
    dataset's own deterministic order). Pool items must be files: the manifest points at them."""
    lines = []
    for si, spec in enumerate(specs):
        ds = build_dataset(spec, channels=1)
        paths = getattr(ds, "paths", None)
        if paths is None and is_pool:
            raise ValueError(f"pool spec {spec!r} has no image files; the pool must be folder:/... or manifest:/...")
        for j in range(len(ds)):
            name = paths[j] if paths is not None else f"{spec}#{j}"
            lines.append(f"{si}\t{j}\t{int(ds.labels[j])}\t{name}")
    return lines


def prepare_sets(cfg: DictConfig) -> dict[str, int]:
    """Write (once) each set's item list; returns {set: number of shards}. A work dir whose lists were made
    from other specs or another shard size is an error: its shards would not match the config."""
    counts = {}
    for name in SETS:
        specs = set_specs(cfg, name)
        if not specs:
            continue
        shards = shard_set(cfg, name)
        want = {"specs": specs, "shard_size": int(cfg.embed.shard_size)}
        if shards.items_file.is_file():
            info = shards.read_items()
            if {k: info[k] for k in want} != want:
                raise StepOutputError(
                    f"{shards.root} was prepared for {info['specs']} (shard_size {info['shard_size']}), the config "
                    f"asks for {specs} (shard_size {want['shard_size']}); use a new work_dir"
                )
        else:
            lines = _list_items(specs, is_pool=(name == "pool"))
            write_lines(shards.root / "items.txt", lines)
            _write_offsets(shards, lines, want["shard_size"])
            n_shards = math.ceil(len(lines) / want["shard_size"])
            shards.write_items({**want, "n_items": len(lines), "n_shards": n_shards})  # marker of the lists
            info = shards.read_items()
        counts[name] = int(info["n_shards"])
    return counts


def _write_offsets(shards: ShardSet, lines: list[str], shard_size: int) -> None:
    """Byte offset [n_shards + 1] of each shard's first line in items.txt: a task seeks to its lines instead
    of reading the whole list (~12 GB at 100M images)."""
    sizes = np.fromiter((len(line.encode("utf-8")) + 1 for line in lines), np.int64, len(lines))
    ends = np.concatenate([[0], np.cumsum(sizes)])  # [n + 1]
    offsets = ends[np.r_[np.arange(0, len(lines), shard_size), len(lines)]]
    atomic_write(shards.root / "items.offsets.npy", lambda f: np.save(f, offsets), mode="wb")


def shard_items(shards: ShardSet, shard_id: int, shard_size: int) -> list[str]:
    """The item lines of one shard, read from their byte offset (older work dirs: offsets made once)."""
    off_file = shards.root / "items.offsets.npy"
    if not off_file.is_file():
        _write_offsets(shards, read_lines(shards.root / "items.txt"), shard_size)
    offsets = np.load(off_file, mmap_mode="r")
    with open(shards.root / "items.txt", "rb") as f:
        f.seek(int(offsets[shard_id]))
        blob = f.read(int(offsets[shard_id + 1] - offsets[shard_id]))
    return blob.decode("utf-8").splitlines()


class _ItemImages(Dataset):
    """Items of one shard -> (preprocessed tensor or None, position in shard)."""

    def __init__(self, lines: list[str], specs: list[str], embedder: Embedder) -> None:
        self.rows = [line.split("\t", 3) for line in lines]
        self.specs, self.embedder = specs, embedder
        self._datasets: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        si, j, _, name = self.rows[i]
        spec = self.specs[int(si)]
        if spec.startswith("fmnist:"):  # in-memory dataset: no file per image
            if int(si) not in self._datasets:
                self._datasets[int(si)] = build_dataset(spec, channels=self.embedder.channels)
            img = self._datasets[int(si)][int(j)][0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # counted in the shard marker instead of a warning per file
                img = load_image(name, channels=self.embedder.channels)
        if img is None:
            return None, i
        try:
            return self.embedder.preprocess(img), i
        except (OSError, ValueError) as e:  # e.g. a zero-size image: count it, do not die
            log.warning("cannot preprocess %s: %s", name, e)
            return None, i


def _collate(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, list[int], list[int]]:
    ok = [(t, i) for t, i in batch if t is not None]
    bad = [i for t, i in batch if t is None]
    tensors = torch.stack([t for t, _ in ok]) if ok else None
    return tensors, [i for _, i in ok], bad


def _fingerprint(embedder: Embedder) -> str:
    return section_fingerprint(embedder.fingerprint())


def embed_shard(cfg: DictConfig | Mapping[str, Any], shard_id: int, set_name: str = "pool",
                embedder: Embedder | None = None) -> bool:
    """Compute and write shard `shard_id` of `set_name`; False (and no work) when it is already complete.

    This is the unit of a SLURM job array: it needs only the config and the prepared item list.
    """
    cfg = _as_cfg(cfg)
    shards = shard_set(cfg, set_name)
    info = shards.read_items()
    if not 0 <= shard_id < info["n_shards"]:
        raise ValueError(f"{set_name} has shards 0..{info['n_shards'] - 1}, got {shard_id}")
    embedder = embedder or build_embedder(cfg.embed)
    fp = _fingerprint(embedder)
    if shards.is_complete(shard_id, fp):
        return False
    size = int(info["shard_size"])
    lines = shard_items(shards, shard_id, size)
    data = _ItemImages(lines, info["specs"], embedder)
    workers = int(cfg.embed.num_workers)
    loader = DataLoader(data, batch_size=int(cfg.embed.batch_size), shuffle=False, num_workers=workers,
                        collate_fn=_collate, persistent_workers=False)
    outs, kept, bad = [], [], []
    bar = tqdm(loader, desc=f"embed {set_name} {shard_id + 1}/{info['n_shards']}", unit="batch",
               disable=not cfg.embed.progress, leave=False)
    for tensors, ok_idx, bad_idx in bar:
        if tensors is not None:
            outs.append(embedder.embed(tensors))  # [b, D]
        kept.extend(ok_idx)
        bad.extend(bad_idx)
    emb = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    rows = [data.rows[i] for i in kept]
    shards.write_shard(shard_id, emb, [r[3] for r in rows], [int(r[2]) for r in rows],
                       [data.rows[i][3] for i in bad], fp)
    if bad:
        log.warning("%s shard %d: skipped %d unreadable image(s), e.g. %s", set_name, shard_id, len(bad),
                    data.rows[bad[0]][3])
    return True


def pending_shards(cfg: DictConfig, embedder: Embedder | None = None) -> list[tuple[str, int]]:
    """(set, shard) pairs still to compute, after preparing the item lists."""
    counts = prepare_sets(cfg)
    fp = _fingerprint(embedder or build_embedder(cfg.embed))
    return [(name, i) for name, n in counts.items() for i in range(n) if not shard_set(cfg, name).is_complete(i, fp)]


def run_embed(cfg: DictConfig) -> dict[str, Any]:
    """All shards of all sets, locally, skipping complete ones; returns counts for the log."""
    embedder = build_embedder(cfg.embed)
    todo = pending_shards(cfg, embedder)
    for name, i in tqdm(todo, desc="embed shards", unit="shard", disable=not cfg.embed.progress or len(todo) < 2):
        embed_shard(cfg, i, name, embedder)
    return {"computed": len(todo)}


def _shards_job(cfg_dict: dict[str, Any], shards: list[tuple[str, int]]) -> int:
    """One array task: its shards in turn (a complete one is skipped); returns how many it computed."""
    cfg = OmegaConf.create(cfg_dict)
    embedder = build_embedder(cfg.embed)
    return sum(embed_shard(cfg, i, name, embedder) for name, i in shards)


def array_tasks(todo: list[tuple[str, int]], array_max: int) -> list[list[tuple[str, int]]]:
    """Pending shards dealt over at most `array_max` tasks (task t: shards t, t + T, ...), so 24,415 shards
    fit a cluster whose MaxArraySize is 1001 and every task has the same amount of work to within one."""
    n_tasks = min(len(todo), array_max)
    return [todo[t::n_tasks] for t in range(n_tasks)]


def submit_embed(cfg: DictConfig, executor: Any) -> list[Any]:
    """Submit the pending shards as one job array on a submitit executor (configured by `launch/`), at most
    `embed.array_max` tasks, `embed.array_parallel` of them at once; returns the jobs. Waiting on them
    (`job.result()`) and rerunning failed ones is the caller's choice: a rerun of `embed` skips every
    complete shard (checked from the markers and the verified stamps: no shard is re-hashed)."""
    todo = pending_shards(cfg)
    if not todo:
        return []
    if hasattr(executor, "update_parameters"):
        executor.update_parameters(slurm_array_parallelism=int(cfg.embed.array_parallel))
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    tasks = array_tasks(todo, int(cfg.embed.array_max))
    return executor.map_array(_shards_job, [cfg_dict] * len(tasks), tasks)


def load_set(cfg: DictConfig, name: str) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """(embeddings [N, D], names, labels [N], skipped names) of a fully embedded set."""
    shards = shard_set(cfg, name)
    return shards.load(int(shards.read_items()["n_shards"]))
