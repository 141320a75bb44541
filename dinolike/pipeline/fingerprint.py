"""Fingerprints: what decides whether a stage is up to date, and what lineage.json records per artifact."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from dinolike.hashing import file_hash

REPO = Path(__file__).resolve().parents[2]


def digest(*parts: Any) -> str:
    """Stable 16-hex hash of JSON-able values (config containers, lists of fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """16-hex sha256 of a file's bytes: the identity of an artifact, wherever it is moved."""
    return file_hash(path, chunk=chunk)[:16]


def git_commit(repo: Path = REPO) -> str:
    """HEAD of the checkout the code runs from, `+dirty` with uncommitted changes; `unknown` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
