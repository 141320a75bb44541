"""KoLeo regulariser: spread features uniformly on the sphere (DINOv2 sec. 4, Sablayrolles et al. 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko differential-entropy estimator, negated, on L2-normalised features.

    Maximising the log distance of every sample to its nearest neighbour spreads the batch over the
    sphere, which helps nearest-neighbour retrieval with the learned features.

    Plain-loop definition (B samples, after x_i <- x_i / ||x_i||):
        total = 0
        for i in range(B):
            j = argmax(<x_i, x_j> for j in range(B) if j != i)     # nearest neighbour on the sphere
            total += -log(||x_i - x_j|| + eps)
        return total / B

    Vectorised: one [B, B] Gram matrix, diagonal set to -2 (below any cosine) so a sample is never
    its own neighbour, argmax per row (no gradient through the choice), then distances to the chosen
    neighbours. Computed in float32 (float64 stays float64) even under autocast.

    The training loop applies it to the student's class tokens separately for each global crop
    (and, under distribution, per rank on the local batch only: no gather), summing over crops.

    Args:
        x: [B, D] features (B >= 2), e.g. student class tokens before the head.
        eps: added to the distance inside the log so that duplicates give a large finite loss.
    Returns:
        scalar loss.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss: expected features [B, D] with B >= 2, got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), p=2, dim=-1, eps=1e-8)  # [B, D]
        with torch.no_grad():
            sims = x @ x.T  # [B, B]
            sims.fill_diagonal_(-2.0)
            nn_idx = sims.argmax(dim=1)  # [B]
        dist = torch.linalg.vector_norm(x - x[nn_idx], dim=-1)  # [B]
        return -torch.log(dist + eps).mean()
