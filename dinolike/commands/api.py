"""The Python API: `dinolike.train`, `dinolike.load`, `dinolike.embed` (re-exported by `dinolike/__init__.py`).

Each is the command of the same name, called from Python: `train` runs exactly what `dinolike train`
runs (the strict config loader, its checks, `dist.local_processes` worker processes, the final kNN),
`embed` what `dinolike embed` runs, without the file. Every error they raise on purpose is a
`dinolike.DinolikeError` (README, "Python API"), whose message is the one line the command would print:
ConfigError (bad recipe, override, argument or data spec, data that does not exist, an output folder in
use: nothing ran), NotFoundError (no such checkpoint or run), CheckpointMismatchError (not a backbone we
read), DataError (no readable image), CollapsedBackboneError (a backbone that gives every image the same
embedding) and TrainError (a run that started and failed or stopped; its cause chained).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from dinolike.config import ConfigError, find_config
from dinolike.errors import CollapsedBackboneError, DinolikeError, NotFoundError
from dinolike.eval.embed import Embeddings, Preprocess

__all__ = ["CollapsedBackboneError", "ConfigError", "DinolikeError", "NotFoundError", "TrainError", "TrainResult",
           "embed", "load", "train"]

DEFAULT_RECIPE = "folder_vits14.yaml"  # ViT-S/14 on your own RGB images (configs/folder_vits14.yaml)


class TrainError(DinolikeError, RuntimeError):
    """A training run that started and did not finish: it failed (collapse, a non-finite loss, unreadable
    data, a full disk; the cause is chained as `__cause__`) or was stopped (`status` 3: run the same call
    again to resume). Its error is in the run's log.txt."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run left its files, and its merged config."""

    run_dir: Path
    config: DictConfig = field(repr=False)  # the merged config (also run_dir/config.yaml)

    @property
    def backbone(self) -> Path:
        """The exported EMA teacher (official DINOv2 keys), what `load` and `embed` read."""
        return self.run_dir / "teacher_backbone.pth"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def knn_top1(self) -> float | None:
        """Top-1 % of the final kNN (k=20) when the recipe ran one (eval.final_knn), else None."""
        res = self.run_dir / "eval_knn" / "results.json"
        return json.loads(res.read_text())["metrics"].get("k20_top1") if res.is_file() else None


def nested(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`optim={"epochs": 3}` or `**{"optim.epochs": 3}` -> {"optim": {"epochs": 3}}: dotted keys split."""
    out: dict[str, Any] = {}
    for key, v in kwargs.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _merge(node[leaf], dict(v)) if isinstance(v, Mapping) and isinstance(node.get(leaf), dict) else v
    return out


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """`b` laid over `a`, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def train(
    out_dir: str | os.PathLike, data: str | os.PathLike | None = None, recipe: str | os.PathLike = DEFAULT_RECIPE,
    **overrides: Any,
) -> TrainResult:
    """Pretrain a backbone on `data` with `recipe` into `out_dir`, as `dinolike train` does.

    data: a dataset spec (`folder:DIR`, `manifest:FILE`, `fmnist:train`), a folder of images or a list
    file; None keeps the recipe's own. recipe: a recipe file or the name of a shipped one
    (`fmnist_smoke.yaml`, `fmnist_cpu.yaml`, `folder_vits14.yaml`). overrides: sections as dicts
    (`optim={"epochs": 3}`) or dotted keys (`**{"optim.epochs": 3}`), checked like the command line's.
    Run it again with the same arguments and it resumes from the newest checkpoint. Raises ConfigError
    before any work (a bad setting, data not found, `out_dir` in use by another run), TrainError when the
    run fails or is stopped (the cause chained).
    """
    from dinolike.data.datasets import as_spec
    from dinolike.jobs.train import train_config, train_job

    delta: dict[str, Any] = {"run": {"output_dir": str(Path(out_dir).absolute())}}
    if data is not None:
        try:
            delta["data"] = {"train": as_spec(data)}
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
    cfg = train_config(find_config(recipe), delta=_merge(delta, nested(overrides)))
    log_txt = Path(cfg.run.output_dir) / "log.txt"
    try:
        status = train_job(cfg)
    except ConfigError:
        raise  # refused before any work (data not found, a folder in use, a changed config on resume)
    except (DinolikeError, OSError, ValueError) as e:  # the run started and failed
        raise TrainError(f"dinolike.train: {type(e).__name__}: {e} (see {log_txt})") from e
    if status != 0:
        what = "was stopped; run the same call again to resume" if status == 3 else "failed"
        raise TrainError(f"dinolike.train: the run {what} (exit status {status}); see its error above and "
                         f"{log_txt}", status)
    return TrainResult(Path(cfg.run.output_dir), cfg)


def load(ckpt_or_run: str | os.PathLike, which: str = "teacher") -> tuple[nn.Module, Preprocess]:
    """(eval-mode backbone, its preprocessing) from a run folder, a checkpoint or an export.

    `preprocess(pil_image)` gives the tensor [C, H, W] the run trained on (grey or RGB, resized,
    center-cropped, normalised); `model(x)` [B, C, H, W] gives the normalised CLS embeddings [B, D].
    """
    from dinolike.eval.embed import load_backbone

    return load_backbone(ckpt_or_run, which)


def embed(
    model: str | os.PathLike | nn.Module, data: str | os.PathLike, preprocess: Preprocess | None = None, *,
    patches: bool = False, batch_size: int = 256, num_workers: int = 0, device: str | None = None,
    progress: bool = False, allow_collapsed: bool = False,
) -> Embeddings:
    """Embeddings of every readable image of `data` (a spec, a folder or a list file), with file names.

    model: a run folder, a checkpoint or an export (its run's preprocessing is used), or a backbone from
    `load` with its `preprocess`. Returns `Embeddings` (`.names`, `.cls` [N, D], `.patches` [N, D] when
    asked for, `.labels`, `.skipped`). A backbone that gives every image the same embedding (a run that
    collapsed or never learned) raises CollapsedBackboneError, unless `allow_collapsed`.
    """
    from dinolike.data.datasets import as_spec, build_dataset
    from dinolike.eval.embed import embed_dataset, load_backbone, refuse_collapsed

    try:
        spec = as_spec(data)
    except ValueError as e:
        raise (NotFoundError if "not found" in str(e) else ConfigError)(f"data: {e}") from None
    if not isinstance(model, nn.Module):
        source = str(model)
        model, preprocess = load_backbone(model)
    elif preprocess is None:
        raise ConfigError("embed(model, ...) with a loaded model needs its preprocess: model, preprocess = load(...)")
    else:
        source = "the model given"
    if not allow_collapsed:
        refuse_collapsed(model, preprocess, source)
    dataset = build_dataset(spec, channels=preprocess.channels)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return embed_dataset(model, dataset, preprocess, patches=patches, batch_size=batch_size,
                         num_workers=num_workers, device=device, progress=progress)
