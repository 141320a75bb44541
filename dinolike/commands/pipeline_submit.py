"""`dinolike pipeline --submit`: each stage as a SLURM job through the launcher (`launch/`), later stages as
dependent jobs (`afterok`), curation's embed as a job array (one task per pending shard).

Each job runs `dinolike pipeline --config X ... --stage S` through `launch.task.LaunchTask` (so a train stage
gets the launcher's signal / checkpoint / requeue protocol), and S's job finds the stages before it
finished. Stages that are up to date are not submitted. What the embed array needs (the demo pool, the
item lists) is written here before submitting, as `dinolike submit curate -- embed` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dinolike.commands.parsing import RaisingParser
from dinolike.commands.submit import parse_args
from dinolike.config import ConfigError
from dinolike.launch import submit as launch_submit
from dinolike.launch.task import LaunchTask
from dinolike.pipeline.lineage import up_to_date
from dinolike.pipeline.stages import Stage, begin_stage, build_stages, run_curate_demo, stage_fingerprint


def plan(cfg: DictConfig) -> tuple[list[Stage], dict[str, str]]:
    """(stages to submit, fingerprints of the finished ones before them): everything from the first stage
    that is not up to date on (a stage after a rerun one reruns too)."""
    out, fps, todo = Path(cfg.output_dir), {}, []
    for stage in build_stages(cfg):
        if not todo:
            fp, _ = stage_fingerprint(out, stage, fps) if all(u in fps for u in stage.upstream) else ("", {})
            if fp and up_to_date(out, stage.name, fp):
                fps[stage.name] = fp
                continue
        todo.append(stage)
    return todo, fps


def _executor(cfg: DictConfig, stage: str, after: list[str]) -> tuple[Any, Any]:
    """(submitit executor, launcher args) for a stage: `submit.launch`, then the stage's own `launch`."""
    out = Path(cfg.output_dir)
    # the launcher's own options and checks; its COMMAND word only names the job, which --job-name does here
    argv = ["train", "--job-dir", str(out / "jobs"), "--job-name", f"pipeline-{stage}",
            *map(str, cfg.submit.launch), *map(str, cfg[stage].launch)]
    try:
        args, rest = parse_args(argv, RaisingParser)
    except ConfigError as e:
        raise ConfigError(f"{stage}.launch / submit.launch: bad launcher options {argv[5:]}: {e}") from None
    if rest or args.local:
        raise ConfigError(f"{stage}.launch: only `dinolike submit` options, not --local or `--`: {argv[5:]}")
    executor = launch_submit.make_executor(args)
    extra = dict(launch_submit.executor_parameters(args).get("slurm_additional_parameters", {}))
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
        extra["kill-on-invalid-dep"] = "yes"  # a failed upstream job cancels this one, not pending forever
    executor.update_parameters(slurm_additional_parameters=extra)
    return executor, args


def submit_pipeline(cfg: DictConfig, config_file: str, overrides: list[str], wait: bool) -> int:
    """Submit the stages that are not up to date; with `wait`, follow them and return 0 when all succeed."""
    out = Path(cfg.output_dir)
    todo, fps = plan(cfg)
    if not todo:
        print(f"dinolike pipeline: {out}: every stage is up to date, nothing to submit", file=sys.stderr)
        return 0
    task_cls = LaunchTask
    job_argv = ["--config", str(Path(config_file).absolute()), *overrides, f"output_dir={out}"]
    jobs: list[tuple[str, Any]] = []
    after: list[str] = []
    for stage in todo:
        if stage.name == "curate":
            after = _submit_embed(cfg, stage, fps, jobs)
        executor, args = _executor(cfg, stage.name, after)
        if stage.name in ("curate", "eval"):  # one process: neither splits its work over ranks
            executor.update_parameters(tasks_per_node=1, nodes=1)
        job = executor.submit(task_cls(command="pipeline", args=[*job_argv, "--stage", stage.name],
                                       cwd=os.getcwd(), max_requeues=args.max_requeues))
        print(f"{stage.name}: job {job.job_id}" + (f" (after {', '.join(after)})" if after else ""))
        jobs.append((stage.name, job))
        after = [job.job_id]
    print(f"logs: {out / 'jobs'}; report when done: {out / 'report.md'}")
    return _wait(jobs, out) if wait else 0


def _submit_embed(cfg: DictConfig, stage: Stage, fps: dict[str, str], jobs: list[tuple[str, Any]]) -> list[str]:
    """The demo pool and item lists here, then the pending embed shards as one array; returns its job id."""
    out = Path(cfg.output_dir)
    fp, ins = stage_fingerprint(out, stage, fps)
    begin_stage(out, stage, fp, ins, fps)  # the folder is this fingerprint's: the curate job resumes in it
    rc = run_curate_demo(out, cfg)
    if rc:
        raise ConfigError(f"curate: writing the demo pool failed (exit status {rc})")
    from dinolike.curation import config as curation_config
    cur = curation_config.load_config(stage.config_file, stage.overrides)
    executor, _ = _executor(cfg, "curate", [])
    executor.update_parameters(tasks_per_node=1, nodes=1, name="pipeline-embed")  # one process per shard
    from dinolike.curation import embed_step as curation_embed
    array = curation_embed.submit_embed(cur, executor)
    if not array:
        return []
    print(f"curate embed: {len(array)} shard(s) as job array {array[0].job_id.split('_')[0]}")
    jobs += [("curate embed", j) for j in array]
    return [array[0].job_id.split("_")[0]]


def _wait(jobs: list[tuple[str, Any]], out: Path) -> int:
    """Follow the jobs in order; at the first failure cancel the rest (their dependency can never be met)."""
    wait_for = launch_submit.wait_for
    for i, (name, job) in enumerate(jobs):
        if name == "curate embed":  # a shard task returns whether it computed the shard, not a status
            try:
                job.result()
                failed = False
            except Exception as e:  # noqa: BLE001 - submitit's job errors carry the task's log
                print(f"shard job {job.job_id} failed: {e}", file=sys.stderr)
                failed = True
        else:
            failed = wait_for(job) != 0
        if failed:
            for _, later in jobs[i + 1 :]:
                later.cancel(check=False)
            print(f"dinolike pipeline: error: {name} (job {job.job_id}) failed; later jobs cancelled; submit "
                  "the same command again to resume", file=sys.stderr)
            return 1
    print(f"dinolike pipeline: all jobs completed; report: {out / 'report.md'}", file=sys.stderr)
    return 0
