"""`dinolike train|distill --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dinolike.local_procs import CHILD_ENV
from dinolike.training.preempt import EXIT_REQUEUE, StopSignal, startup_signals

if TYPE_CHECKING:  # the heavy imports (torch, omegaconf) wait until the stop signals are caught
    from omegaconf import DictConfig


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"dinolike {command}", description=__doc__)
    p.add_argument("--config", help="recipe yaml (a delta on configs/base.yaml): a path, or the name of a recipe "
                   "shipped with dinolike (fmnist_smoke.yaml, folder_vits14.yaml, ...)")
    if command == "distill":
        p.add_argument("--teacher", help="pretraining checkpoint of the frozen teacher (= distill.teacher)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    command = argv[0]
    return command, build_parser(command).parse_intermixed_args(argv[1:])


def missing_config_message() -> str:
    """No --config: base.yaml alone is the ViT-L schema (125k iterations of 224 px crops), never what a user
    meant, so name the recipes instead of starting it."""
    from dinolike.config import CONFIG_DIR

    recipes = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name != "base.yaml")
    return ("give a recipe with --config FILE, e.g. --config fmnist_cpu.yaml (the CPU main job) or "
            f"--config folder_vits14.yaml (your images, one GPU); shipped (by name from any folder): "
            f"{', '.join(recipes)}")


def validate(argv: list[str]) -> DictConfig:
    """The merged config of `train|distill ARGS`, checked before any work (also what `dinolike submit`
    runs before submitting). Raises ConfigError; argparse exits on a malformed command line."""
    from dinolike.config import ConfigError, load_config
    from dinolike.training.validate import check_train_config

    command, args = parse(argv)
    if not args.config:
        raise ConfigError(missing_config_message())
    overrides = list(args.overrides)
    if command == "distill" and args.teacher:
        overrides.append(f"distill.teacher={args.teacher}")
    cfg = load_config(args.config, overrides)
    if command == "distill" and not cfg.distill.teacher:
        raise ConfigError("give the teacher checkpoint (--teacher CKPT or distill.teacher=...)")
    check_train_config(cfg)
    return cfg


def main(argv: list[str]) -> int:
    """`dinolike train|distill ARGS`: from its first line, a stop signal or Ctrl-C ends it with one line (a
    Ctrl-C during `import torch` used to print a 72-line traceback, a SIGTERM killed it silently)."""
    command = argv[0]
    try:
        with startup_signals():
            return _main(argv)
    except StopSignal as e:
        print(f"\ndinolike {command}: stopped by {e.name} outside the training loop (start-up, export or final "
              "kNN); the newest checkpoint (if any) is intact: run the same command to start or resume",
              file=sys.stderr)
        return EXIT_REQUEUE
    except KeyboardInterrupt:  # the second Ctrl-C (the first stops with a checkpoint), or one before training
        print(f"\ndinolike {command}: interrupted; the newest checkpoint (if any) is intact: run the same command "
              "to resume", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    from dinolike.config import ConfigError
    from dinolike.training.rundir import check_output_dir

    command = argv[0]
    try:
        cfg = validate(argv)
        if os.environ.get(CHILD_ENV) != "1":  # once, here, before any child process starts
            check_output_dir(Path(cfg.run.output_dir))
    except ConfigError as e:
        print(f"dinolike {command}: error: {e}", file=sys.stderr)
        return 2
    from dinolike.data.datasets import DataError
    from dinolike.models import CheckpointMismatchError
    from dinolike.training.checkpoint import NonFiniteStateError, RunWriteError
    from dinolike.training.collapse import CollapseError
    from dinolike.training.loop import NonFiniteLossError

    try:
        return run(argv, cfg)
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


def run(argv: list[str], cfg: DictConfig) -> int:
    """Run `dinolike train|distill ARGV` whose checked config is `cfg` (from `validate(argv)`): in this
    process, or as `dist.local_processes` processes it starts and supervises; then the final kNN. Returns
    the exit status; the training errors (a non-finite loss, a collapse, a bad dataset ...) are raised."""
    from contextlib import nullcontext

    from dinolike.training.data import check_data_exists
    from dinolike.training.rundir import check_output_dir
    from dinolike.training.runlock import RunLock, lock_holder

    check_data_exists(cfg.data.train)
    if lock_holder():
        check_output_dir(Path(cfg.run.output_dir))  # the API comes here without `main`'s check
    with RunLock(Path(cfg.run.output_dir)) if lock_holder() else nullcontext():  # one folder, one run
        return _run(argv, cfg)


def _run(argv: list[str], cfg: DictConfig) -> int:
    from dinolike.dist import launcher
    from dinolike.local_procs import run_local
    from dinolike.training.loop import train

    local_child = os.environ.get(CHILD_ENV) == "1"
    n_local = cfg.dist.local_processes
    if n_local > 1 and launcher() == "single":
        status = run_local(argv, n_local)
        if status == 0 and cfg.eval.final_knn:
            return final_knn(cfg)  # once, here: the children leave it to this parent
        return status
    if n_local > 1 and not local_child:
        logging.getLogger("dinolike.train").info(
            "dist.local_processes=%d ignored: torchrun/SLURM started this job's processes", n_local)
    status = train(cfg)
    if status == 0 and cfg.eval.final_knn and not local_child:
        return final_knn(cfg)  # under torchrun/SLURM every rank takes part (features are extracted in shards)
    return status


def final_knn(cfg: DictConfig) -> int:
    """The full kNN evaluation of the exported teacher, printed as a table at the end of the run (and into
    its log.txt, by rank 0)."""
    from dinolike.commands.packages import import_command
    from dinolike.training.tracking import RunLog

    knn_main = import_command("eval.knn").main
    out = Path(cfg.run.output_dir)
    with RunLog(out, is_main=os.environ.get("RANK", "0") == "0"):
        print("\nkNN evaluation of the trained backbone:", file=sys.stderr)
        try:
            return knn_main([
                "--pretrained", str(out / "teacher_backbone.pth"),
                "--config", str(out / "config.yaml"),
                "--train-dataset", cfg.eval.final_train,
                "--val-dataset", cfg.eval.final_val,
                "--output-dir", str(out / "eval_knn"),
            ])
        except KeyboardInterrupt:
            print(f"\ninterrupted during the final kNN; training is complete ({out / 'teacher_backbone.pth'}): "
                  f"`dinolike eval knn --pretrained {out / 'teacher_backbone.pth'}` evaluates it later",
                  file=sys.stderr)
            return 130
