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
    """{fingerprint, bytes} of one artifact; paths in lineage are relative to the pipeline folder."""
    return {"fingerprint": file_digest(path), "bytes": path.stat().st_size}


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
