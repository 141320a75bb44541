"""Does a backbone tell images apart at all? The mean cosine between the CLS embeddings of different images.

A backbone whose every input gets the same embedding is worthless, yet nothing else makes it obvious: its
losses look like a slow start, its kNN is the majority class, and it exports like any other. It happens
when the residual branches barely touch the tokens: with LayerScale 1e-5 a freshly initialised ViT
gives every image the CLS token `norm(cls + pos[0])` (cosine 1 - 1e-7 between images), and a short or
small run never grows out of it. Measured on random ViTs (probe images below): LayerScale 1e-5 gives
1.00000, 0.1 gives 0.85-0.98, 1.0 gives 0.41-0.77; trained backbones sit far below 1. A mean cosine of at
least CONSTANT_COSINE is what "every image gets the same output" means here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONSTANT_COSINE = 0.9999


def mean_pairwise_cosine(z: Tensor) -> Tensor:
    """Mean cosine similarity over the pairs of distinct rows of `z` [N, D] (N >= 2): 1 when every row
    points the same way. Float32 whatever the input dtype."""
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to compare, got {n}")
    u = F.normalize(z.detach().float(), dim=-1)  # [N, D]
    total = u.sum(0)  # [D]: sum_ij u_i . u_j = |sum_i u_i|^2, without the N x N matrix
    return (total.dot(total) - n) / (n * (n - 1))


def probe_images(n: int, channels: int, size: int, seed: int = 0) -> Tensor:
    """`n` smooth random images [n, C, size, size], roughly zero-mean unit-variance (normalised inputs):
    random fields of 2 to 16 cells a side, upsampled, so that coarse and fine structure both vary."""
    g = torch.Generator().manual_seed(seed)
    cells = [2, 4, 8, 16]
    images = [F.interpolate(torch.randn(1, channels, c, c, generator=g), size=(size, size), mode="bicubic",
                            align_corners=False) for c in (cells[i % len(cells)] for i in range(n))]
    return torch.cat(images)  # [n, C, size, size]


@torch.no_grad()
def backbone_cls_cosine(backbone: nn.Module, channels: int, size: int, n: int = 32) -> float:
    """Mean CLS cosine of `backbone` over `n` probe images at `size` px: what `dinolike export` checks
    when it has no images of the run at hand (a constant backbone is constant for any input)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        cls = backbone.forward_features(probe_images(n, channels, size).to(device))["x_norm_clstoken"]  # [n, D]
    finally:
        backbone.train(was_training)
    return float(mean_pairwise_cosine(cls))
