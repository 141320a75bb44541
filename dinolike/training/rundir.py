"""The run folder before any work: can it be written, and do its checkpoints belong to this config?

Both used to fail late or not at all: an output_dir that is a file, or on a read-only mount, raised a
traceback from deep inside (or after the model was built); a resume with a changed config (say
`optim.epochs=4` over a finished 1-epoch run) spliced two runs silently: the lr jumped back up, the
schedules were stretched mid-run and config.yaml was overwritten with settings the first part never saw.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dinolike.config import OPERATIONAL, ConfigError, changed_keys

log = logging.getLogger("dinolike.train")

# Besides OPERATIONAL, what a resume may change: where the run lives, how it is watched and evaluated
# (periodic and final kNN, the collapse watch), the phase it started from, and this switch itself.
# The layout may change too (a job resumed on another number of processes or with another strategy), as long
# as the global batch stays: that one is compared as data.batch_size x processes, not key by key.
RESUME_MAY_CHANGE = (*OPERATIONAL, "run.output_dir", "run.resume", "run.init_from", "run.allow_config_change",
                     "eval.", "collapse.", "dist.strategy", "dist.local_processes", "data.batch_size")


def check_output_dir(out: Path) -> None:
    """Create `out` (and parents) and prove a file can be written in it; ConfigError in one line if not."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir {out} is a file, not a folder: choose another run.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"run.output_dir {out} is not writable ({e.strerror or e}): choose another "
                          "run.output_dir or fix its permissions") from None


def check_resume_config(saved_json: str, current: dict[str, Any], source: Path, allow: bool,
                        saved_world: int | None, world: int) -> None:
    """Refuse to resume from a checkpoint written with other settings (listing the keys that differ),
    unless `allow` (run.allow_config_change=true), which logs them instead. Operational keys may differ, and
    so may the number of processes when the global batch stays (`saved_world`: processes that wrote the
    checkpoint, None when unknown)."""
    saved = json.loads(saved_json)
    diff = changed_keys(saved, current, ignore=RESUME_MAY_CHANGE)
    old_batch = saved.get("data", {}).get("batch_size")
    new_batch = current["data"]["batch_size"]
    if old_batch is not None and old_batch * (saved_world or world) != new_batch * world:
        diff.append(("global batch (data.batch_size x processes)", old_batch * (saved_world or world),
                     new_batch * world))
    if not diff:
        return
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
    if allow:
        log.warning("resuming from %s with changed settings (run.allow_config_change=true): %s", source.name, listed)
        return
    raise ConfigError(
        f"{source} was written with other settings than this run's: {listed}. Resuming would splice two "
        "runs (schedules and lr jump mid-run): run the same command as before, give a new run.output_dir, "
        "or pass run.allow_config_change=true to resume with the changes"
    )


def write_config_atomically(text: str, path: Path) -> None:
    """config.yaml by temp file + rename: a crash never leaves half a config beside the checkpoints."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
