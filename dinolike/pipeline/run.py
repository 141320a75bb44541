"""Running the pipeline here (`dinolike pipeline --config X`): every stage in order, each a job called in
this process (`stages.py`), skipped when up to date, its state, lineage and report written as it ends.

What `run_local` does for a whole pipeline, a SLURM job submitted by `dinolike pipeline --submit` does
for one stage (`only`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from omegaconf import DictConfig, OmegaConf

from dinolike.pipeline.config import TRAIN_STAGES
from dinolike.pipeline.lineage import (
    artifact_record,
    now,
    read_state,
    state_path,
    up_to_date,
    write_json,
    write_lineage,
)
from dinolike.pipeline.report import MIN_CURVE_POINTS, REPORT_DIR, write_report
from dinolike.pipeline.stages import (
    RUNNERS,
    Stage,
    StageError,
    artifacts,
    begin_stage,
    build_stages,
    stage_dir,
    stage_fingerprint,
    training_finished,
)

log = logging.getLogger("dinolike.pipeline")
EXIT_REQUEUE = 3  # a train stage stopped on a signal after saving a checkpoint (dinolike.training.preempt)


def is_main_rank() -> bool:
    """Bookkeeping (state files, wiping, lineage, report) is rank 0's in a multi-task SLURM job."""
    return int(os.environ.get("RANK", "0")) == 0


def pipeline_record(cfg: DictConfig, config_file: str) -> dict:
    return {"config_file": str(Path(config_file).absolute()), "config": OmegaConf.to_container(cfg, resolve=True)}


def finish_stage(out: Path, stage: Stage, state: dict, t0: float) -> None:
    """Record the stage's artifacts, then lineage.json and report.md."""
    recs = {os.path.relpath(p, out): artifact_record(out, p) for p in artifacts(out, stage.name)}
    write_json(state_path(out, stage.name), {**state, "status": "done", "finished": now(),
                                             "seconds": round(time.perf_counter() - t0, 1), "artifacts": recs})


def update_records(cfg: DictConfig, config_file: str) -> None:
    out, stages = Path(cfg.output_dir), [str(s) for s in cfg.stages]
    write_lineage(out, pipeline_record(cfg, config_file), stages)
    from dinolike.eval import plot as plots
    (out / REPORT_DIR).mkdir(exist_ok=True)
    curves = {}
    for s in stages:
        st = read_state(out, s)
        if s in TRAIN_STAGES and st is not None and st["status"] == "done":
            png = out / REPORT_DIR / f"{s}_curves.png"
            png.unlink(missing_ok=True)  # a rerun with fewer logged points gets the table, not an old picture
            logged, _ = plots.read_metrics(stage_dir(out, s) / "metrics.jsonl")
            if len(logged) >= MIN_CURVE_POINTS:  # fewer: the report shows them as a table
                curves[s] = plots.plot_curves(stage_dir(out, s), png, dpi=60)
    write_report(out, pipeline_record(cfg, config_file), stages, curves)


def run_stage(cfg: DictConfig, stage: Stage, upstream: dict[str, str], config_file: str) -> tuple[int, str]:
    """Run one stage unless it is up to date; returns (exit status, or -1 when skipped; its fingerprint)."""
    out = Path(cfg.output_dir)
    fp, ins = stage_fingerprint(out, stage, upstream)
    if up_to_date(out, stage.name, fp):
        log.info("%s: up to date (%s), skipped", stage.name, fp)
        return -1, fp
    main = is_main_rank()
    state = begin_stage(out, stage, fp, ins, upstream, bookkeeping=main)
    t0 = time.perf_counter()
    rc = RUNNERS[stage.name](out, stage, cfg)
    if rc == 0 and stage.name in TRAIN_STAGES and not training_finished(out, stage):
        rc = EXIT_REQUEUE  # stopped early (run.time_limit_min) with a checkpoint: not done, resumable
    if rc == 0 and main:
        finish_stage(out, stage, state, t0)
        update_records(cfg, config_file)
    return rc, fp


def hold_folder(out: Path) -> IO[str]:
    """An exclusive lock on the pipeline folder for this process's life: a second pipeline run in the same
    folder would train into the same checkpoints, or move the folder from under the first. Raises
    StageError naming the holder when another process has it."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".pipeline.lock", "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StageError(f"{out} is in use by another `dinolike pipeline` ({holder}); wait for it to end") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def run_local(cfg: DictConfig, config_file: str, only: str | None = None) -> int:
    """Every stage in order here (or only `only`, whose inputs must be finished)."""
    stages = build_stages(cfg)
    out = Path(cfg.output_dir)
    _lock = hold_folder(out) if only is None else None  # held while this function runs (a --stage job's
    # submitter placed it after its upstream jobs, so it does not take the folder's lock)
    fps: dict[str, str] = {}
    ran = []
    for stage in stages:
        if only is not None and stage.name != only:
            st = read_state(out, stage.name)  # a job trusts the finished stages it depends on
            if st is not None and st["status"] == "done":
                fps[stage.name] = st["fingerprint"]
            continue
        rc, fps[stage.name] = run_stage(cfg, stage, fps, config_file)
        if rc == EXIT_REQUEUE:
            print(f"dinolike pipeline: stage {stage.name!r} stopped with a checkpoint; run the same command "
                  "again to resume it", file=sys.stderr)
            return rc
        if rc > 0:
            print(f"dinolike pipeline: error: stage {stage.name!r} failed (exit status {rc}); fix it and run the "
                  "same command again to resume", file=sys.stderr)
            return rc
        if rc == 0:
            ran.append(stage.name)
    if not ran:
        print(f"dinolike pipeline: {out}: every stage is up to date, nothing to do", file=sys.stderr)
    else:
        print(f"dinolike pipeline: ran {', '.join(ran)}; report: {out / 'report.md'}", file=sys.stderr)
    return 0
