"""`dinolike train|distill --config FILE [key=value ...]`: parse, build the checked config
(`dinolike.jobs.train.train_config`), run the job (`dinolike.jobs.train.train_job`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from dinolike.commands.parsing import RaisingParser
from dinolike.config import ConfigError
from dinolike.jobs.train import grey_scale_warning, train_config, train_job
from dinolike.local_procs import CHILD_ENV


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
    overrides = list(args.overrides)
    if command == "distill" and args.teacher:
        overrides.append(f"distill.teacher={args.teacher}")
    return train_config(args.config, overrides, distill=command == "distill")


def validate(argv: list[str]) -> DictConfig:
    """The merged config of `train|distill ARGS`, checked before any work (what `dinolike submit` runs
    before submitting). Raises ConfigError, for a malformed command line too."""
    command = argv[0]
    return config_of(command, build_parser(command, RaisingParser).parse_intermixed_args(argv[1:]))


def main(argv: list[str]) -> int:
    command = argv[0]
    args = build_parser(command).parse_intermixed_args(argv[1:])
    try:
        cfg = config_of(command, args)
    except ConfigError as e:
        print(f"dinolike {command}: error: {e}", file=sys.stderr)
        return 2
    return run_job(cfg, command)


def run_job(cfg: DictConfig, command: str = "train") -> int:
    """`train_job(cfg)` with the command's handling of its failures: one line on stderr and an exit status
    (what the pipeline's train stages run too)."""
    if os.environ.get(CHILD_ENV) != "1" and (warning := grey_scale_warning(cfg)):
        print(f"dinolike {command}: warning: {warning}", file=sys.stderr)
    from dinolike.data.datasets import DataError
    from dinolike.models import CheckpointMismatchError
    from dinolike.training.checkpoint import NonFiniteStateError, RunWriteError
    from dinolike.training.collapse import CollapseError
    from dinolike.training.loop import NonFiniteLossError

    try:
        return train_job(cfg, command)
    except (NonFiniteLossError, NonFiniteStateError, CollapseError, RunWriteError) as e:
        print(f"dinolike {command}: error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"dinolike {command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointMismatchError, DataError, ValueError) as e:
        # problems the user can fix: one line, no traceback from deep inside
        print(f"dinolike {command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk or the file system: a full disk outside a checkpoint write, a lost mount
        where = f" ({e.filename})" if e.filename else ""
        print(f"dinolike {command}: error: {e.strerror or e}{where}; the newest checkpoint in "
              f"{Path(cfg.run.output_dir) / 'checkpoints'} is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C (the first stops with a checkpoint), or one before training
        print(f"\ndinolike {command}: interrupted; the newest checkpoint in "
              f"{Path(cfg.run.output_dir) / 'checkpoints'} (if any) is intact: run the same command to resume",
              file=sys.stderr)
        return 130
