"""`dinolike train|distill --config FILE [key=value ...]`: parse, build the checked config
(`dinolike.jobs.train.train_config`), run the job (`dinolike.jobs.train.run_training`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dinolike.training.preempt import EXIT_REQUEUE, StopSignal, startup_signals

if TYPE_CHECKING:  # the heavy imports (torch, omegaconf) wait until the stop signals are caught
    from omegaconf import DictConfig


def build_parser(command: str, parser: type[argparse.ArgumentParser] = argparse.ArgumentParser
                 ) -> argparse.ArgumentParser:
    p = parser(prog=f"dinolike {command}", description=__doc__)
    p.add_argument("--config", help="recipe yaml (a delta on configs/base.yaml): a path, or the name of a recipe "
                   "shipped with dinolike (fmnist_smoke.yaml, folder_vits14.yaml, ...)")
    if command == "distill":
        p.add_argument("--teacher", help="pretraining checkpoint of the frozen teacher (= distill.teacher)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def config_of(command: str, args: argparse.Namespace) -> DictConfig:
    """The checked config of a parsed command line. Raises ConfigError."""
    from dinolike.jobs.train import train_config

    overrides = list(args.overrides)
    if command == "distill" and args.teacher:
        overrides.append(f"distill.teacher={args.teacher}")
    return train_config(args.config, overrides, distill=command == "distill")


def validate(argv: list[str]) -> DictConfig:
    """The merged config of `train|distill ARGS`, checked before any work (what `dinolike submit` runs
    before submitting). Raises ConfigError, for a malformed command line too."""
    from dinolike.commands.parsing import RaisingParser

    command = argv[0]
    return config_of(command, build_parser(command, RaisingParser).parse_intermixed_args(argv[1:]))


def train_command(argv: list[str]) -> int:
    """`dinolike train ARGS`."""
    return run_command("train", argv)


def distill_command(argv: list[str]) -> int:
    """`dinolike distill ARGS`."""
    return run_command("distill", argv)


def main(argv: list[str]) -> int:
    """`train|distill ARGS`, the command's name first (what the local worker processes run)."""
    return run_command(argv[0], argv[1:])


def run_command(command: str, argv: list[str]) -> int:
    """`dinolike COMMAND ARGV`: from its first line, a stop signal or Ctrl-C ends it with one line (a Ctrl-C
    during `import torch` used to print a 72-line traceback, a SIGTERM killed it silently)."""
    try:
        with startup_signals():
            return _main(command, argv)
    except StopSignal as e:
        print(f"\ndinolike {command}: stopped by {e.name} outside the training loop (start-up, export or final "
              "kNN); the newest checkpoint (if any) is intact: run the same command to start or resume",
              file=sys.stderr)
        return EXIT_REQUEUE
    except KeyboardInterrupt:  # the second Ctrl-C (the first stops with a checkpoint), or one before training
        print(f"\ndinolike {command}: interrupted; the newest checkpoint (if any) is intact: run the same command "
              "to resume", file=sys.stderr)
        return 130


def _main(command: str, argv: list[str]) -> int:
    from dinolike.config import ConfigError
    from dinolike.jobs.train import run_training

    args = build_parser(command).parse_intermixed_args(argv)
    try:
        cfg = config_of(command, args)
    except ConfigError as e:
        print(f"dinolike {command}: error: {e}", file=sys.stderr)
        return 2
    return run_training(cfg, command)
