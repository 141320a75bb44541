"""Few-label evaluation: the labelled train set cut to a fraction or to N images per class.

Why: users pretrain because they have many images and few labels. The semi-supervised protocols of
SimCLR and DINO train the probe on 1 % or 10 % of the labels; few-shot protocols on N images per class.
A split is class-stratified (every class keeps its share, at least one image), drawn with a fixed seed,
and the result over several seeds is reported as mean and spread, since one small split is noisy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class FewLabelError(ValueError):
    """A split that cannot be drawn (more shots than a class has, a fraction outside (0, 1])."""


def per_class_counts(labels: Tensor, fraction: float | None = None, shots: int | None = None) -> dict[int, int]:
    """How many images of each class a split keeps: `shots` each, or round(fraction * n_c) (at least 1)."""
    if (fraction is None) == (shots is None):
        raise FewLabelError("give exactly one of a train fraction or a number of shots per class")
    classes, sizes = torch.unique(labels, return_counts=True)
    out: dict[int, int] = {}
    for c, n in zip(classes.tolist(), sizes.tolist(), strict=True):
        if shots is not None:
            if shots < 1:
                raise FewLabelError(f"--shots must be >= 1, got {shots}")
            if shots > n:
                raise FewLabelError(f"--shots {shots}: class {c} has only {n} labelled images")
            out[c] = shots
        else:
            if not 0 < fraction <= 1:
                raise FewLabelError(f"--train-fraction must be in (0, 1], got {fraction}")
            out[c] = min(n, max(1, math.floor(fraction * n + 0.5)))
    return out


def few_label_indices(labels: Tensor, seed: int, fraction: float | None = None, shots: int | None = None) -> Tensor:
    """Indices [M] into `labels` [N] of a class-stratified split, sorted; the same seed gives the same split.

    Each class's images are permuted with a generator seeded by (seed, class), so a class's pick does not
    depend on the other classes (adding a class to the set leaves the others' picks unchanged).
    """
    labels = labels.cpu().long()
    keep = per_class_counts(labels, fraction, shots)
    picked = []
    for c, k in keep.items():
        members = torch.nonzero(labels == c).flatten()  # [n_c]
        g = torch.Generator().manual_seed(1_000_003 * seed + c)
        picked.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(picked).sort().values


def split_label(fraction: float | None, shots: int | None) -> str:
    """How a split is named in result files: `1%` / `10-shot` / `100%`."""
    if shots is not None:
        return f"{shots}-shot"
    if fraction is None or fraction >= 1:
        return "100%"
    return f"{100 * fraction:g}%"


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd
