"""Files of the work dir: atomic writes, embedding shards with completion markers, step outputs.

Every file is written to a temporary name in the same folder and moved into place with `os.replace`, so a
killed process leaves either the old file or the new one, never half of one. A shard's marker is written
last, with the SHA-256 of the shard's files: a shard without a marker, or whose files no longer match the
marker's checksums, is not computed; `embed` recomputes it and no later step reads it as data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

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
    def _marker_info(self, i: int) -> dict[str, Any] | None:
        """The marker's content; None when it is missing or unreadable (an unreadable one: a warning)."""
        try:
            with open(self.marker(i), encoding="utf-8") as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s): shard %d counts as not computed", self.marker(i), e, i)
            return None
        return info if isinstance(info, dict) else None

    def damage(self, i: int, info: dict[str, Any]) -> str | None:
        """Why shard `i`'s files do not match its marker (None when they do): a file changed, truncated or
        emptied after the shard was committed must not be read as embeddings."""
        digests = info.get("sha256")
        for path, kind in ((self.npy(i), "npy"), (self.paths_file(i), "paths")):
            if not path.is_file():
                return f"{path.name} is missing"
            if digests is not None and _sha256(path.read_bytes()) != digests[kind]:
                return f"{path.name} does not match the checksum in {self.marker(i).name}"
        if digests is None:  # a marker from before checksums: at least the row counts must agree
            rows = np.load(self.npy(i), mmap_mode="r").shape[0]
            if not rows == info.get("rows") == len(read_lines(self.paths_file(i))):
                return f"{self.npy(i).name} row count disagrees with {self.marker(i).name}"
        return None

    def stamp(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.verified.json"

    def _stat(self, i: int) -> list[list[int]]:
        return [[p.stat().st_size, p.stat().st_mtime_ns] for p in (self.npy(i), self.paths_file(i))]

    def check(self, i: int, info: dict[str, Any]) -> str | None:
        """`damage`, hashed once: a stamp keyed by the files' (size, mtime) skips the SHA-256 afterwards, so a
        resubmission or a later step does not re-read hundreds of GB of finished shards."""
        try:
            stat = self._stat(i)
        except FileNotFoundError as e:
            return f"{Path(e.filename).name} is missing"
        try:
            if json.loads(self.stamp(i).read_text()) == stat:
                return None
        except (OSError, ValueError):
            pass
        why = self.damage(i, info)
        if why is None:
            write_json(self.stamp(i), stat)
        return why

    def is_complete(self, i: int, fingerprint: str) -> bool:
        """True when shard `i` was fully written by an embedder with this fingerprint and is undamaged
        (a damaged shard is reported and counts as not computed, so `embed` recomputes it).

        A marker from another embedder is an error, not a silent recompute: mixing two embedders' shards in
        one work dir would give meaningless similarities."""
        info = self._marker_info(i)
        if info is None:
            return False
        if info.get("fingerprint") != fingerprint:
            raise StepOutputError(
                f"{self.marker(i)} was written by another embedder config ({info.get('fingerprint')} != "
                f"{fingerprint}); use a new work_dir or delete {self.root}"
            )
        why = self.check(i, info)
        if why is not None:
            log.warning("shard %d of %s is damaged (%s): it will be recomputed", i, self.root, why)
            return False
        return True

    def write_shard(
        self, i: int, emb: np.ndarray, names: list[str], labels: list[int], skipped: list[str], fingerprint: str
    ) -> None:
        """Embeddings and names first, the marker (with their checksums) last: the marker is the commit point."""
        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float32, copy=False))
        lines = "".join(f"{n}\t{lab}\n" for n, lab in zip(names, labels, strict=True)).encode("utf-8")
        atomic_write(self.npy(i), lambda f: f.write(buf.getvalue()), mode="wb")
        atomic_write(self.paths_file(i), lambda f: f.write(lines), mode="wb")
        write_json(self.marker(i), {"rows": int(emb.shape[0]), "skipped": skipped, "fingerprint": fingerprint,
                                    "sha256": {"npy": _sha256(buf.getvalue()), "paths": _sha256(lines)}})
        write_json(self.stamp(i), self._stat(i))  # hashed above from the very bytes written: verified

    def load(self, n_shards: int) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        """All shards concatenated: (embeddings [N, D] float32, names, labels [N], skipped names).
        Every shard is checked against its marker's checksums first: damage is an error, never data."""
        embs, names, labels, skipped = [], [], [], []
        for i in range(n_shards):
            info = self._marker_info(i)
            if info is None:
                raise StepOutputError(f"shard {self.npy(i)} is not complete: run (or finish) the `embed` step")
            why = self.check(i, info)
            if why is not None:
                raise StepOutputError(f"shard {i} of {self.root} is damaged ({why}): run `embed` again to recompute it")
            embs.append(np.load(self.npy(i)))
            for line in read_lines(self.paths_file(i)):
                name, _, lab = line.rpartition("\t")
                names.append(name)
                labels.append(int(lab))
            skipped.extend(info["skipped"])
        embs = [e for e in embs if e.shape[0]]  # a shard whose images were all unreadable has no rows
        emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
        return emb, names, np.asarray(labels, dtype=np.int64), skipped


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
