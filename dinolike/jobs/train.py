"""The training job: `dinolike train|distill`, the pipeline's train stages and `dinolike.train` call
`train_job(cfg)` with a config from `train_config`, in this process.

The only command line left is at the one real process boundary: with `dist.local_processes` > 1 the job
starts that many worker processes (`dinolike.local_procs`), each of which loads the resolved config
written for them.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinolike.config import CONFIG_DIR, ConfigError, load_config
from dinolike.dist import launcher
from dinolike.local_procs import CHILD_ENV, run_local
from dinolike.training.rundir import check_output_dir


def missing_config_message() -> str:
    """No recipe: base.yaml alone is the ViT-L schema (125k iterations of 224 px crops), never what a user
    meant, so name the recipes instead of starting it."""
    recipes = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name != "base.yaml")
    return ("give a recipe with --config FILE, e.g. --config fmnist_cpu.yaml (the CPU main job) or "
            f"--config folder_vits14.yaml (your images, one GPU); shipped (by name from any folder): "
            f"{', '.join(recipes)}")


def train_config(recipe: str | Path | None, overrides: Sequence[str] = (), *, distill: bool = False,
                 delta: Mapping[str, Any] | None = None) -> DictConfig:
    """The merged, checked config of a training run: schema <- `recipe` <- `overrides` (`key=value`) <-
    `delta` (a nested mapping, the Python API's keyword arguments). Raises ConfigError."""
    from dinolike.training.validate import check_train_config

    if not recipe:
        raise ConfigError(missing_config_message())
    cfg = load_config(recipe, list(overrides), delta=delta)
    if distill and not cfg.distill.teacher:
        raise ConfigError("give the teacher checkpoint (--teacher CKPT or distill.teacher=...)")
    check_train_config(cfg)
    return cfg


def _local_processes(cfg: DictConfig, command: str, n: int) -> int:
    """Run the job as `n` worker processes on this machine; each reads the resolved config from a file."""
    with tempfile.TemporaryDirectory(prefix="dinolike-run-") as tmp:
        path = Path(tmp) / "config.yaml"
        OmegaConf.save(cfg, path, resolve=True)
        return run_local([command, "--config", str(path)], n)


def train_job(cfg: DictConfig, command: str = "train") -> int:
    """Run training whose checked config is `cfg` (from `train_config`): in this process, or as
    `dist.local_processes` processes it starts and supervises; then the final kNN. Returns the exit
    status; the training errors (a non-finite loss, a collapse, a bad dataset ...) are raised."""
    from dinolike.training.data import check_data_exists
    from dinolike.training.runlock import RunLock, lock_holder

    check_data_exists(cfg.data.train)
    if not lock_holder():  # a worker of a local or torchrun/SLURM job: its parent / rank 0 holds the folder
        return _train(cfg, command)
    check_output_dir(Path(cfg.run.output_dir))  # once, here, before any child process starts
    with RunLock(Path(cfg.run.output_dir)):  # one output folder, one run
        return _train(cfg, command)


def _train(cfg: DictConfig, command: str) -> int:
    from dinolike.training.loop import train

    local_child = os.environ.get(CHILD_ENV) == "1"
    n_local = cfg.dist.local_processes
    if n_local > 1 and launcher() == "single":
        status = _local_processes(cfg, command, n_local)
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
    from dinolike.eval.config import EvalError, job_config
    from dinolike.eval.features import FeatureError
    from dinolike.eval.protocols import eval_knn
    from dinolike.training.tracking import RunLog

    out = Path(cfg.run.output_dir)
    backbone = out / "teacher_backbone.pth"
    with RunLog(out, is_main=os.environ.get("RANK", "0") == "0"):
        print("\nkNN evaluation of the trained backbone:", file=sys.stderr)
        try:
            eval_knn(job_config(str(backbone), str(out / "config.yaml"), (), {
                "train_dataset": cfg.eval.final_train, "val_dataset": cfg.eval.final_val,
                "output_dir": str(out / "eval_knn")}))
        except (EvalError, FeatureError, FileNotFoundError) as e:
            print(f"dinolike eval knn: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ninterrupted during the final kNN; training is complete ({backbone}): "
                  f"`dinolike eval knn --pretrained {backbone}` evaluates it later", file=sys.stderr)
            return 130
    return 0


def run_training(cfg: DictConfig, command: str = "train") -> int:
    """`train_job(cfg)` with the command's handling of its failures: one line on stderr and an exit status
    (what `dinolike train` and the pipeline's train stages run; the Python API calls `train_job` itself and
    gets the exceptions)."""
    from dinolike.checkpoints.files import NonFiniteStateError, RunWriteError
    from dinolike.data.datasets import DataError
    from dinolike.models import CheckpointMismatchError
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
