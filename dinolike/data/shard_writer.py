"""Write a folder, a manifest or the curation pipeline's kept set as WebDataset tar shards + an index.

The shards are written with `webdataset.TarWriter` (the format's own writer; `pip install
'dinolike[shards]'`), each to a temp name and renamed when complete, then read back once with the
standard `tarfile` module to record each member's byte offset (the `.idx.npy` sidecar that random
access needs) and hashed for the index's md5sum. `index.json` is written last: a folder with an index
is a complete data set. Image bytes are stored as they are (no re-encoding, no quality loss).

Parallel writing at scale: `part`/`parts` writes every `parts`-th shard (shard k by part k % parts, each
part a separate process or SLURM task), each part records `index.part-I-of-N.json`, and `merge_index`
joins them into `index.json` once all parts are done.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinolike.hashing import file_hash

from .datasets import _IMAGE_READ_ERRORS, DataError, build_dataset, parse_spec, read_image
from .shards import FORMAT_VERSION, INDEX_KIND, INDEX_NAME, sidecar_name

__all__ = ["ShardConfig", "merge_index", "source_spec", "write_shards"]


@dataclass
class ShardConfig:
    """What `dinolike shard` writes: `shard_size` items per shard; `check` decodes every image first and
    leaves out (and counts) those that do not decode, so training never meets them."""

    source: str
    out: str
    shard_size: int = 5000
    check: bool = True
    part: int = 0
    parts: int = 1


def source_spec(source: str) -> str:
    """A dataset spec from what the command accepts: `folder:` / `folder-nolabels:` / `manifest:` specs,
    `curation:WORK_DIR` (the kept set `curate build` wrote: WORK_DIR/manifest.txt), a folder or a file."""
    if source.startswith("curation:"):
        manifest = Path(source.partition(":")[2]) / "manifest.txt"
        if not manifest.is_file():
            raise DataError(f"{source}: no manifest.txt there; run the curation pipeline's build step first")
        return f"manifest:{manifest}"
    path = Path(source)
    if path.is_dir():
        return f"folder:{path}"
    if path.is_file():
        return f"manifest:{path}"
    scheme, _ = parse_spec(source)
    if scheme in ("fmnist", "shards"):
        raise DataError(f"{source}: shards are written from image files (folder, manifest or curation output)")
    return source


def _ext(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".") or "img"
    return "jpg" if ext == "jpeg" else ext


def _scan(tar_path: Path, n: int) -> np.ndarray:
    """int64 [n, 3] (data offset, size, label) of the image members, read back with the tarfile module."""
    side = np.full((n, 3), -1, dtype=np.int64)
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            stem, _, ext = member.name.partition(".")
            row = int(stem)
            if ext == "cls":
                side[row, 2] = int(tf.extractfile(member).read())
            else:
                side[row, 0], side[row, 1] = member.offset_data, member.size
    return side


def _write_one(out: Path, name: str, items: list[tuple[str, int]], check: bool) -> tuple[dict, int]:
    """One shard from (path, label) items; returns its index entry and the number of images left out."""
    from webdataset import TarWriter

    tmp = out / f".{name}.tmp"
    kept = dropped = 0
    with TarWriter(str(tmp), encoder=False, mtime=0.0) as tw:
        for path, label in items:
            try:
                data = Path(path).read_bytes()
                if check:
                    read_image(io.BytesIO(data))
            except (*_IMAGE_READ_ERRORS, FileNotFoundError):
                dropped += 1
                continue
            sample = {"__key__": f"{kept:09d}", _ext(path): data}
            if label >= 0:
                sample["cls"] = str(int(label)).encode()
            tw.write(sample)
            kept += 1
    if kept == 0:
        tmp.unlink()
        return {}, dropped
    side = _scan(tmp, kept)
    os.replace(tmp, out / name)
    side_tmp = out / f".{sidecar_name(name)}.tmp.npy"
    np.save(side_tmp, side)
    os.replace(side_tmp, out / sidecar_name(name))
    size, md5 = (out / name).stat().st_size, file_hash(out / name, "md5")
    entry = {"url": name, "nsamples": kept, "filesize": size, "md5sum": md5}
    return entry, dropped


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_shards(cfg: ShardConfig) -> dict[str, Any]:
    """Write the shards of `cfg.source` into `cfg.out`; returns the summary (also in the index).

    The source is listed once here, by the writer (never by a training reader): a folder walk or a
    manifest read holds O(items) paths in this one process."""
    if cfg.shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {cfg.shard_size}")
    if not 0 <= cfg.part < cfg.parts:
        raise ValueError(f"need 0 <= part < parts, got part {cfg.part} of {cfg.parts}")
    spec = source_spec(cfg.source)
    ds = build_dataset(spec)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(ds) // cfg.shard_size)
    entries: list[dict] = []
    dropped = 0
    for k in range(cfg.part, n_shards, cfg.parts):
        lo, hi = k * cfg.shard_size, min(len(ds), (k + 1) * cfg.shard_size)
        items = [(ds.paths[i], int(ds.labels[i])) for i in range(lo, hi)]
        entry, bad = _write_one(out, f"shard-{k:06d}.tar", items, cfg.check)
        dropped += bad
        if entry:
            entries.append(entry)
    meta = {"format": FORMAT_VERSION, "source": spec, "items": sum(e["nsamples"] for e in entries),
            "left_out_unreadable": dropped, "num_classes": int(getattr(ds, "num_classes", 0)),
            "classes": list(getattr(ds, "classes", []))}
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": out.name, "shardlist": entries, "dinolike": meta}
    if cfg.parts == 1:
        if not entries:
            raise DataError(f"{cfg.source}: none of its {len(ds)} images could be read; no shards written")
        _write_json(out / INDEX_NAME, index)
    else:
        _write_json(out / f"index.part-{cfg.part}-of-{cfg.parts}.json", index)
    return {"out": str(out), "shards": len(entries), **meta}


def merge_index(out: str | os.PathLike, parts: int) -> dict[str, Any]:
    """Join the `parts` part indexes of a parallel write into index.json (shards in name order)."""
    out = Path(out)
    files = [out / f"index.part-{i}-of-{parts}.json" for i in range(parts)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{out}: parts not written yet: {', '.join(missing)}")
    idx = [json.loads(f.read_text()) for f in files]
    entries = sorted((e for i in idx for e in i["shardlist"]), key=lambda e: e["url"])
    meta = dict(idx[0]["dinolike"], items=sum(e["nsamples"] for e in entries),
                left_out_unreadable=sum(i["dinolike"]["left_out_unreadable"] for i in idx))
    if not entries:
        raise DataError(f"{out}: the parts wrote no shards")
    _write_json(out / INDEX_NAME, {**idx[0], "shardlist": entries, "dinolike": meta})
    return {"out": str(out), "shards": len(entries), **meta}
