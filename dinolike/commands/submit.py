"""`dinolike submit train|distill|eval|curate [SLURM options] -- <dinolike args>` (`python -m launch ...` in a
checkout): parse the launcher's options, check the command's own arguments and config here, then submit
through `dinolike.launch.submit` (submitit). ``args`` below are the parsed launcher options, which the
library reads as they are (`executor_parameters`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from dinolike.launch.submit import (
    COMMANDS,
    DEFAULT_JOB_DIR,
    executor_parameters,
    make_executor,
    submit,
    submit_embed_array,
    wait_for,
)
from dinolike.launch.task import EXIT_REQUEUE

__all__ = ["COMMANDS", "EXIT_REQUEUE", "build_parser", "parse_args", "executor_parameters", "make_executor",
           "submit", "wait_for", "main"]


def build_parser(parser: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser(
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


def parse_args(argv: list[str], parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
               ) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, the command's own arguments); RaisingParser as `parser_class` raises ConfigError
    where the command line would exit."""
    parser = build_parser(parser_class)
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
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, passthrough = parse_args(argv)
    if args.entry == build_parser().get_default("entry"):  # another entry point has its own arguments
        status = validate_passthrough(args.command, passthrough)
        if status is not None:
            return status
    if args.command == "curate" and passthrough[:1] == ["embed"]:
        from dinolike.commands.curate import validate as curate_config

        return submit_embed_array(args, curate_config(passthrough)[1])
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
