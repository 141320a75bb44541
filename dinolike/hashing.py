"""One way to hash a file's bytes, streamed: checkpoint manifests (SHA-256), shard indexes (MD5, the field wids
reads) and the pipeline's artifact fingerprints all call it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of the file at `path`, read `chunk` bytes at a time (memory stays flat for 100 GB files)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
