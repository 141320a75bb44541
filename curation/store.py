"""Files of the work dir: atomic writes, embedding shards with completion markers, step outputs.

Every file is written to a temporary name in the same folder and moved into place with `os.replace`, so a
killed process leaves either the old file or the new one, never half of one. A shard's marker is written
last: a shard without a marker (or whose marker disagrees with its files) is incomplete and recomputed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "StepOutputError",
    "atomic_write",
    "write_json",
    "write_lines",
    "save_npz",
    "read_lines",
    "ShardSet",
]


class StepOutputError(RuntimeError):
    """A step's inputs are missing or inconsistent (e.g. `dedup` before `embed`); the message says which."""


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call `write(file)` on a temp file next to `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True, default=str))


def write_lines(path: str | Path, lines: list[str]) -> None:
    atomic_write(path, lambda f: f.writelines(line + "\n" for line in lines))


def read_lines(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")


class ShardSet:
    """The embedding shards of one image set (`pool`, `references` or `seeds`) under `root`.

    Shard `i` covers items `[i * shard_size, (i + 1) * shard_size)` of the set's item list and consists of
    `shard_XXXXX.npy` (float32 [n_ok, D], L2-normalised rows), `shard_XXXXX.paths.txt` (name<TAB>label of
    each row) and `shard_XXXXX.done.json` (the marker: row count, skipped items, embedder fingerprint).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ layout
    @property
    def items_file(self) -> Path:
        return self.root / "items.json"

    def npy(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.npy"

    def paths_file(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.paths.txt"

    def marker(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.done.json"

    # ------------------------------------------------------------------ items
    def write_items(self, info: dict[str, Any]) -> None:
        write_json(self.items_file, info)

    def read_items(self) -> dict[str, Any]:
        if not self.items_file.is_file():
            raise StepOutputError(f"{self.items_file} is missing: run the `embed` step first")
        with open(self.items_file, encoding="utf-8") as f:
            return json.load(f)

    # ------------------------------------------------------------------ shards
    def is_complete(self, i: int, fingerprint: str) -> bool:
        """True when shard `i` was fully written by an embedder with this fingerprint.

        A marker from another embedder is an error, not a silent recompute: mixing two embedders' shards in
        one work dir would give meaningless similarities."""
        if not self.marker(i).is_file():
            return False
        with open(self.marker(i), encoding="utf-8") as f:
            info = json.load(f)
        if info.get("fingerprint") != fingerprint:
            raise StepOutputError(
                f"{self.marker(i)} was written by another embedder config ({info.get('fingerprint')} != "
                f"{fingerprint}); use a new work_dir or delete {self.root}"
            )
        if not (self.npy(i).is_file() and self.paths_file(i).is_file()):
            return False
        rows = np.load(self.npy(i), mmap_mode="r").shape[0]
        return rows == info.get("rows") == len(read_lines(self.paths_file(i)))

    def write_shard(
        self, i: int, emb: np.ndarray, names: list[str], labels: list[int], skipped: list[str], fingerprint: str
    ) -> None:
        """Embeddings and names first, the marker last (the marker is the commit point)."""
        atomic_write(self.npy(i), lambda f: np.save(f, emb.astype(np.float32, copy=False)), mode="wb")
        write_lines(self.paths_file(i), [f"{n}\t{lab}" for n, lab in zip(names, labels, strict=True)])
        write_json(self.marker(i), {"rows": int(emb.shape[0]), "skipped": skipped, "fingerprint": fingerprint})

    def load(self, n_shards: int) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        """All shards concatenated: (embeddings [N, D] float32, names, labels [N], skipped names)."""
        embs, names, labels, skipped = [], [], [], []
        for i in range(n_shards):
            if not self.marker(i).is_file():
                raise StepOutputError(f"shard {self.npy(i)} is not complete: run (or finish) the `embed` step")
            embs.append(np.load(self.npy(i)))
            for line in read_lines(self.paths_file(i)):
                name, _, lab = line.rpartition("\t")
                names.append(name)
                labels.append(int(lab))
            with open(self.marker(i), encoding="utf-8") as f:
                skipped.extend(json.load(f)["skipped"])
        embs = [e for e in embs if e.shape[0]]  # a shard whose images were all unreadable has no rows
        emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
        return emb, names, np.asarray(labels, dtype=np.int64), skipped
