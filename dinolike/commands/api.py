"""The Python API: `dinolike.train`, `dinolike.load`, `dinolike.embed` (re-exported by `dinolike/__init__.py`).

Each is the command of the same name, called from Python: `train` runs exactly what `dinolike train`
runs (the strict config loader, its checks, `dist.local_processes` worker processes, the final kNN),
`embed` what `dinolike embed` runs, without the file. Bad input raises an exception whose message is the
one line the command would print (ConfigError, a ValueError, for a config or a data spec;
FileNotFoundError for a missing checkpoint); a run that fails raises TrainError.
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
from dinolike.eval.embed import Embeddings, Preprocess

DEFAULT_RECIPE = "folder_vits14.yaml"  # ViT-S/14 on your own RGB images (configs/folder_vits14.yaml)


class TrainError(RuntimeError):
    """A training run that ended with a non-zero status (its error was printed and is in log.txt)."""


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
    Run it again with the same arguments and it resumes from the newest checkpoint.
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
    status = train_job(cfg)
    if status != 0:
        raise TrainError(f"dinolike.train: the run stopped with exit status {status}; see its error above and "
                         f"{cfg.run.output_dir}/log.txt (run the same call again to resume)")
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
    progress: bool = False,
) -> Embeddings:
    """Embeddings of every readable image of `data` (a spec, a folder or a list file), with file names.

    model: a run folder, a checkpoint or an export (its run's preprocessing is used), or a backbone from
    `load` with its `preprocess`. Returns `Embeddings` (`.names`, `.cls` [N, D], `.patches` [N, D] when
    asked for, `.labels`, `.skipped`).
    """
    from dinolike.data.datasets import as_spec, build_dataset
    from dinolike.eval.embed import embed_dataset, load_backbone

    if not isinstance(model, nn.Module):
        model, preprocess = load_backbone(model)
    elif preprocess is None:
        raise ValueError("embed(model, ...) with a loaded model needs its preprocess: model, preprocess = load(...)")
    dataset = build_dataset(as_spec(data), channels=preprocess.channels)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return embed_dataset(model, dataset, preprocess, patches=patches, batch_size=batch_size,
                         num_workers=num_workers, device=device, progress=progress)
