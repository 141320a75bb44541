"""Stage state (`stages/<stage>.json`) and `lineage.json`, the record of where every artifact came from.

Each stage writes only its own state file, atomically: `running` with its fingerprint when it starts (so a
rerun after a crash knows the half-done folder belongs to the same inputs and resumes it), `done` with its
artifacts when it ends. `lineage.json` is assembled from those files, so stages that run as separate SLURM
jobs never read-modify-write one shared file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fingerprint import file_digest

STATE_DIR = "stages"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, obj: Any) -> None:
    """Temp file + rename: a reader (or a rerun after a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def state_path(out: Path, stage: str) -> Path:
    return out / STATE_DIR / f"{stage}.json"


def read_state(out: Path, stage: str) -> dict[str, Any] | None:
    path = state_path(out, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def artifact_record(out: Path, path: Path) -> dict[str, Any]:
    """{fingerprint, bytes, mtime_ns} of one artifact (the caller keys it by its path relative to `out`)."""
    st = path.stat()
    return {"fingerprint": file_digest(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def recorded_digest(out: Path, path: Path, stages: Sequence[str]) -> str | None:
    """The fingerprint a finished stage recorded for `path`, if the file still has that size and time:
    each run of the pipeline fingerprints its inputs, and re-reading GB checkpoints every time (on every
    rank of a job) would cost minutes; None when no record matches (the caller hashes the file)."""
    rel = os.path.relpath(path, out)
    st = path.stat()
    for name in stages:
        state = read_state(out, name)
        rec = (state or {}).get("artifacts", {}).get(rel) if (state or {}).get("status") == "done" else None
        if rec and rec.get("bytes") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return rec["fingerprint"]
    return None


def intact(out: Path, state: dict[str, Any]) -> bool:
    """Every artifact a finished stage recorded is still there with its size (hashing GB checkpoints
    on every rerun would cost more than the check is worth; a changed file of the same size is not caught)."""
    for rel, rec in state.get("artifacts", {}).items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != rec["bytes"]:
            return False
    return True


def up_to_date(out: Path, stage: str, fingerprint: str) -> bool:
    s = read_state(out, stage)
    return s is not None and s["status"] == "done" and s["fingerprint"] == fingerprint and intact(out, s)


def lineage(out: Path, pipeline: dict[str, Any], stages: list[str]) -> dict[str, Any]:
    """The lineage document: the pipeline config, each stage's state, and per artifact its stage, config,
    input fingerprints, git commit and times."""
    states = {s: st for s in stages if (st := read_state(out, s)) is not None}
    artifacts = {}
    for stage, st in states.items():
        for rel, rec in st.get("artifacts", {}).items():
            artifacts[rel] = {
                "stage": stage, **rec, "stage_fingerprint": st["fingerprint"], "config": st["recipe"],
                "overrides": st["overrides"], "config_fingerprint": st["config_fingerprint"],
                "inputs": st["inputs"], "git_commit": st["git_commit"],
                "started": st["started"], "finished": st.get("finished"),
            }
    return {"pipeline": pipeline, "stages": states, "artifacts": artifacts}


def write_lineage(out: Path, pipeline: dict[str, Any], stages: list[str]) -> Path:
    path = out / "lineage.json"
    write_json(path, lineage(out, pipeline, stages))
    return path
