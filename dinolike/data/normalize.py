"""Pixel statistics, defined once, and the eval preprocessing that ends with them.

Training (`data.mean/std`), evaluation, curation and the timm export all normalise with these numbers;
one home keeps a channel count from getting the statistics of another dataset in one place only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)  # Fashion-MNIST train-set pixel statistics, in [0, 1] units
FMNIST_STD = (0.3530,)


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) when a config gives none: Fashion-MNIST's for 1 channel, ImageNet's otherwise."""
    return (FMNIST_MEAN, FMNIST_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def build_eval_transform(
    resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Any], torch.Tensor]:
    """Resize shorter side -> center crop -> tensor -> normalise (the standard eval preprocessing)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
