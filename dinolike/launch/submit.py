"""`python -m launch train|distill|eval|curate [SLURM options] -- <dinolike args>`.

Submits the dinolike command as a SLURM job through submitit: one task per GPU (``--tasks-per-node``
on CPU clusters), logs in the job folder, ``--signal=USR2@<signal_delay_s>`` and ``--requeue`` so
the preemption protocol of `launch.task` can checkpoint and requeue. ``--local`` runs the same job
on this machine with submitit's local executor (same tasks, same requeue protocol).

torchrun needs nothing from here: ``torchrun --nproc-per-node 2 -m dinolike.cli train ...`` works
because the trainer reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK variables (exit status 3 means
"checkpoint saved after a stop request, run again").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from dinolike.launch.task import EXIT_REQUEUE, LaunchTask

COMMANDS = ("train", "distill", "eval", "curate")
DEFAULT_JOB_DIR = "runs/_jobs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinolike submit",
        description="Submit a dinolike command to SLURM (or run it locally) through submitit.",
        epilog="Everything after `--` is passed to `dinolike COMMAND`.",
    )
    p.add_argument("command", choices=COMMANDS, help="the dinolike command the job runs")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task is started per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node on CPU-only clusters (default: gpus-per-node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (default: SLURM's)")
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--timeout", type=int, default=60, metavar="MIN", help="time limit in minutes")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument("--constraint", default=None, help="SLURM node features, e.g. a100")
    p.add_argument("--job-name", default=None, help="SLURM job name (default: dinolike-COMMAND)")
    p.add_argument("--job-dir", default=DEFAULT_JOB_DIR,
                   help="submitit folder; each job gets DIR/<job id>/ with its logs and pickles")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="SIGUSR2 this many seconds before the time limit (time to save a checkpoint)")
    p.add_argument("--max-requeues", type=int, default=20,
                   help="stop requeueing after this many restarts of the job")
    p.add_argument("--local", action="store_true", help="run on this machine (submitit local executor)")
    p.add_argument("--wait", action="store_true", help="wait for the job and return its status")
    p.add_argument("--entry", default="dinolike.cli:main", help=argparse.SUPPRESS)  # tests / other programs
    return p  # fmt: skip


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher options before the first `--`, the dinolike arguments after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    own, passthrough = split_argv(argv)
    args = parser.parse_args(own)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.gpus_per_node < 0:
        parser.error("--gpus-per-node must be >= 0")
    if args.tasks_per_node is None:
        args.tasks_per_node = max(1, args.gpus_per_node)
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        parser.error(f"one task per GPU: --tasks-per-node {args.tasks_per_node} != --gpus-per-node "
                     f"{args.gpus_per_node} (leave --tasks-per-node out on GPU clusters)")  # fmt: skip
    if args.tasks_per_node < 1:
        parser.error("--tasks-per-node must be >= 1")
    if args.timeout < 1:
        parser.error("--timeout must be >= 1 minute")
    if args.signal_delay_s >= 60 * args.timeout:
        parser.error(f"--signal-delay-s {args.signal_delay_s} must be shorter than --timeout {args.timeout} min")
    if args.local and args.nodes != 1:
        parser.error("--local runs on this machine: --nodes must be 1")
    return args, passthrough


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
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


def make_executor(args: argparse.Namespace):
    import submitit

    folder = Path(args.job_dir).absolute() / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else "slurm")
    executor.update_parameters(**executor_parameters(args))
    return executor


def submit(args: argparse.Namespace, passthrough: list[str]):
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


def submit_embed_array(args: argparse.Namespace, passthrough: list[str]) -> int:
    """`curate -- embed --config X ...`: one array task per pending shard (a shard that is already
    complete is not submitted; a failed or preempted shard is picked up by the next submission)."""

    from dinolike.commands import curate as curate_cli
    cargs = curate_cli.build_parser().parse_intermixed_args(passthrough)
    from dinolike.curation import config as curation_config
    cfg = curation_config.load_config(cargs.config, cargs.overrides)
    from dinolike.curation import embed as curation_embed
    submit_embed = curation_embed.submit_embed
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


def validate_passthrough(command: str, passthrough: list[str]) -> int | None:
    """Run the command's own argument and config checks here, before anything is submitted: an error in
    the config surfaces now as one line, not minutes later in a job's log. None when valid, else the
    exit status (nothing is submitted)."""
    from dinolike.config import ConfigError

    try:
        if command in ("train", "distill"):
            from dinolike.commands.train import validate
        elif command == "eval":
            from dinolike.commands.eval import validate
        else:
            from dinolike.commands import curate as curate_cli
            validate = curate_cli.validate
        validate([command, *passthrough] if command in ("train", "distill") else passthrough)
    except ConfigError as e:
        print(f"dinolike submit {command}: error: {e}; nothing submitted", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse printed the problem (or --help): nothing to submit either way
        return 2 if e.code else 0
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, passthrough = parse_args(argv)
    if args.entry == build_parser().get_default("entry"):  # another entry point has its own arguments
        status = validate_passthrough(args.command, passthrough)
        if status is not None:
            return status
    if args.command == "curate" and passthrough[:1] == ["embed"]:
        return submit_embed_array(args, passthrough)
    try:
        job = submit(args, passthrough)
    except Exception as e:  # sbatch rejected the job, or no SLURM here
        where = "locally" if args.local else "to SLURM"
        print(f"could not submit {args.command} {where}: {e}", file=sys.stderr)
        return 1
    folder = job.paths.folder
    print(f"submitted job {job.job_id}: dinolike {args.command} {' '.join(passthrough)}")
    print(f"logs: {folder}")
    if args.local or args.wait:
        status = wait_for(job)
        if args.local:  # the local executor leaves an empty literal "%j" folder behind
            with contextlib.suppress(OSError):
                (Path(args.job_dir).absolute() / "%j").rmdir()
        print(f"job {job.job_id} {'completed' if status == 0 else 'failed'}")
        return status
    return 0


__all__ = ["COMMANDS", "EXIT_REQUEUE", "build_parser", "parse_args", "executor_parameters", "submit", "main"]
