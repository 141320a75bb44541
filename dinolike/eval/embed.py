"""Embeddings of a set of images by a trained backbone, with the run's own preprocessing.

What `dinolike embed` and the Python API's `load` / `embed` share: a backbone loaded from any checkpoint,
run folder or export, the preprocessing its run trained with (resize, center crop, mean/std from the
run's config, as `dinolike export` writes it), and one pass of the frozen-feature extractor the eval
commands use, so an embedding here is the feature kNN and the linear probe saw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dinolike.data.normalize import build_eval_transform
from dinolike.errors import CollapsedBackboneError, NotFoundError
from dinolike.eval.features import extract_features
from dinolike.eval.spread import CONSTANT_COSINE, backbone_cls_cosine
from dinolike.interop.common import describe_backbone
from dinolike.interop.run_info import Preprocessing, find_run_config, preprocessing


@dataclass(frozen=True)
class Preprocess:
    """A PIL image -> the tensor [C, crop, crop] the backbone expects: grey-scale or RGB as the model's
    input channels, shorter side resized (bicubic), center-cropped, normalised with the run's statistics."""

    numbers: Preprocessing
    channels: int

    def transform(self) -> Any:
        """The torchvision part (after the colour conversion), for a dataset that already converts."""
        n = self.numbers
        return build_eval_transform(n.resize, n.crop, n.mean, n.std)

    def __call__(self, img: Image.Image) -> Tensor:
        return self.transform()(img.convert("L" if self.channels == 1 else "RGB"))  # [C, crop, crop]


@dataclass
class Embeddings:
    """One row per readable image, in the dataset's order.

    names: [N] file paths relative to the image folder (absolute for a manifest; `split/index` for
    Fashion-MNIST). cls: [N, D] float32, the final normalised CLS token (what kNN compares).
    patches: [N, D] float32 mean of the final normalised patch tokens, or None when not asked for.
    labels: [N] int64 first-level sub-folder index (-1 without one). skipped: names that could not be read.
    """

    names: list[str]
    cls: np.ndarray
    patches: np.ndarray | None
    labels: np.ndarray
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_backbone(path: str | Path, which: str = "teacher") -> tuple[nn.Module, Preprocess]:
    """(eval-mode backbone, its preprocessing) from a checkpoint, a run folder or an export; the
    preprocessing is the run's (the config a training checkpoint carries, else the run folder's)."""
    from dinolike.interop import load_pretrained

    if not Path(path).exists():
        raise NotFoundError(f"checkpoint not found: {path}")
    model, _ = load_pretrained(path, which=which)
    explicit = describe_backbone(model)
    run_cfg, _ = find_run_config(path)
    return model.eval(), Preprocess(preprocessing(run_cfg, explicit), int(explicit["in_chans"]))


def item_names(dataset: Any) -> list[str]:
    """A name for every item of a dataset built by `build_dataset`: the file path (relative to an image
    folder's root), or `split/index` for Fashion-MNIST, whose images are not files."""
    paths: Sequence[str] | None = getattr(dataset, "paths", None)
    if paths is None:
        return [f"{getattr(dataset, 'split', 'item')}/{i:05d}" for i in range(len(dataset))]
    root = getattr(dataset, "root", None)
    return [os.path.relpath(p, root) if root is not None else p for p in paths]


def embed_dataset(
    model: nn.Module,
    dataset: Any,
    preprocess: Preprocess,
    *,
    patches: bool = True,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Embeddings:
    """Embed every readable image of `dataset` (built with the model's channels) in batches; an unreadable
    file is skipped and named in `skipped`. Raises FeatureError when no image can be read."""
    n = preprocess.numbers
    feats = extract_features(
        model, dataset, preprocess.transform(), channels=preprocess.channels, mean=n.mean, std=n.std,
        resolution=n.crop, resize=n.resize, n_last_blocks=1, batch_size=batch_size, num_workers=num_workers,
        device=device, progress=progress, desc="embed",
    )
    names = item_names(dataset)
    assert feats.index is not None  # extract_features records each row's dataset index
    kept = feats.index.tolist()
    missing = sorted(set(range(len(names))) - set(kept))
    pm = feats.patch_mean
    return Embeddings(
        names=[names[i] for i in kept],
        cls=feats.cls[:, -1].float().numpy(),  # [N, D]
        patches=pm.float().numpy() if patches and pm is not None else None,  # [N, D]
        labels=feats.labels.numpy().astype(np.int64),
        skipped=[names[i] for i in missing],
    )


def refuse_collapsed(model: nn.Module, preprocess: Preprocess, source: str) -> None:
    """CollapsedBackboneError when `model` gives 32 probe images the same CLS embedding: the check
    `dinolike export` and the end of a run make, so that no path hands out such embeddings silently (a run
    that refused its export used to be embedded from its checkpoint: mean cosine 0.99999)."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "forward_features"):  # a caller's own module: no CLS token to probe
        return
    cosine = backbone_cls_cosine(backbone, preprocess.channels, preprocess.numbers.crop)
    if cosine >= CONSTANT_COSINE:
        raise CollapsedBackboneError(
            f"refusing to embed with {source}: it gives every input the same CLS embedding (mean cosine "
            f"{cosine:.5f} over 32 probe images), so it has collapsed or never learned (a run that ended so "
            "exports nothing, and embed used to fall back to its checkpoint); allow_collapsed=True "
            "(--allow-collapsed) embeds anyway")
