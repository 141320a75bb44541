"""Submitting a dinolike command as a SLURM job (`dinolike submit`, dinolike/commands/submit.py, parses it).

Submits the dinolike command as a SLURM job through submitit: one task per GPU (``--tasks-per-node``
on CPU clusters), logs in the job folder, ``--signal=USR2@<signal_delay_s>`` and ``--requeue`` so
the preemption protocol of `dinolike.launch.task` can checkpoint and requeue. ``--local`` runs the same job
on this machine with submitit's local executor (same tasks, same requeue protocol).

torchrun needs nothing from here: ``torchrun --nproc-per-node 2 -m dinolike.cli train ...`` works
because the trainer reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK variables (exit status 3 means
"checkpoint saved after a stop request, run again").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dinolike.launch.task import LaunchTask

COMMANDS = ("train", "distill", "eval", "curate")
DEFAULT_JOB_DIR = "runs/_jobs"


def executor_parameters(args: Any) -> dict[str, Any]:
    """AutoExecutor parameters; the slurm_* ones are ignored by the local executor."""
    params: dict[str, Any] = {
        "name": args.job_name or f"dinolike-{args.command}",
        "timeout_min": args.timeout,
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.local:  # submitit's local executor sends SIGUSR2 30 s before timeout_min (not configurable)
        return params
    params["slurm_signal_delay_s"] = args.signal_delay_s
    params["slurm_additional_parameters"] = {"requeue": True}
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    return params


def make_executor(args: Any):
    import submitit

    folder = Path(args.job_dir).absolute() / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else "slurm")
    executor.update_parameters(**executor_parameters(args))
    return executor


def submit(args: Any, passthrough: list[str]):
    """Submit the job; returns the submitit Job."""
    task = LaunchTask(
        command=args.command, args=list(passthrough), cwd=os.getcwd(), entry=args.entry,
        max_requeues=args.max_requeues,
    )  # fmt: skip
    return make_executor(args).submit(task)


def wait_for(job) -> int:
    """Block until the job ends; 0 on success, 1 (with the job's error) otherwise."""
    try:
        results = job.results()  # one per task
    except Exception as e:  # submitit raises FailedJobError / UncompletedJobError with the task log
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    return 0 if all(r == 0 for r in results) else 1


def submit_embed_array(args: Any, cfg: DictConfig) -> int:
    """`curate -- embed --config X ...` (`cfg`: that curation config): one array task per pending shard (a
    shard that is already complete is not submitted; a failed or preempted shard is picked up by the next
    submission)."""
    from dinolike.curation.embed_step import submit_embed

    executor = make_executor(args)
    executor.update_parameters(tasks_per_node=1, nodes=1)  # one process per shard
    jobs = submit_embed(cfg, executor)
    if not jobs:
        print("embed: every shard is already complete")
        return 0
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted {len(jobs)} embed task(s) (each a share of the pending shards) as job array {array_id}")
    if not (args.local or args.wait):
        return 0
    failed = 0
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - report every failed shard, then fail once
            failed += 1
            print(f"embed task {job.job_id} failed: {e}", file=sys.stderr)
    return 1 if failed else 0
