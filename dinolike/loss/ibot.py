"""iBOT masked-image-modelling loss: the student predicts the teacher's patch targets at masked tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ibot_masks_weight(masks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-masked-token weight 1 / (number of masked tokens in its crop), in `tokens[masks]` order.

    So that each masked crop contributes equally however many of its patches were masked.

    Args:
        masks: [C, P] bool, True where a patch token of crop c is masked.
    Returns:
        [M] weights of the given dtype, M = masks.sum(), ordered as `patch_tokens[masks]` (row-major).
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(
            f"ibot_masks_weight: expected bool masks [C, P], got {masks.dtype} {tuple(masks.shape)}"
        )
    per_crop = masks.sum(dim=-1, keepdim=True).clamp_min(1).to(dtype)  # [C, 1]
    return (1.0 / per_crop).expand_as(masks)[masks]  # [M]


def ibot_loss(
    student_patch_logits: Tensor,
    teacher_probs: Tensor,
    masks_weight: Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> Tensor:
    """Weighted cross-entropy over masked patch tokens, averaged over crops.

    Plain-loop definition (M masked tokens over all crops of this rank, K prototypes):
        total = 0
        for m in range(M):
            log_p = log_softmax(student_patch_logits[m] / student_temp)
            total += masks_weight[m] * -sum(teacher_probs[m, k] * log_p[k] for k in range(K))
        return total / n_crops
    With masks_weight[m] = 1 / (masked tokens in m's crop) (see `ibot_masks_weight`), this is the mean
    over crops of each crop's mean token cross-entropy, where crops with no masked token count as 0.
    DINOv2 passes n_crops = all global crops of the local batch (2 * B), masked or not.

    Vectorised: one row-wise sum of teacher_probs * log_softmax, a dot with the weights.
    Computed in float32 (float64 stays float64) even under autocast. With M == 0 the result is a zero
    that is still connected to the student graph (backward works and yields zero gradients).

    Args:
        student_patch_logits: [M, K] student logits at masked positions.
        teacher_probs: [M, K] teacher targets at the same positions (e.g. Sinkhorn-Knopp output).
        masks_weight: [M] per-token weights.
        n_crops: number of crops the loss is averaged over (> 0).
        student_temp: student softmax temperature.
    Returns:
        scalar loss.
    """
    if student_patch_logits.ndim != 2 or teacher_probs.shape != student_patch_logits.shape:
        raise ValueError(
            "ibot_loss: expected student and teacher of the same shape [M, K], got "
            f"{tuple(student_patch_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if masks_weight.shape != student_patch_logits.shape[:1]:
        raise ValueError(
            f"ibot_loss: masks_weight must be [M] = [{student_patch_logits.shape[0]}], "
            f"got {tuple(masks_weight.shape)}"
        )
    if n_crops <= 0:
        raise ValueError(f"ibot_loss: n_crops must be positive, got {n_crops}")
    if not student_temp > 0:
        raise ValueError(f"ibot_loss: student_temp must be > 0, got {student_temp}")
    if student_patch_logits.shape[0] == 0:
        zero = student_patch_logits.sum() * 0.0  # [] still connected to the student graph
        return zero.to(torch.promote_types(zero.dtype, torch.float32))
    with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
        dtype = torch.promote_types(
            torch.promote_types(student_patch_logits.dtype, teacher_probs.dtype), torch.float32
        )
        log_p = F.log_softmax(student_patch_logits.to(dtype) / student_temp, dim=-1)  # [M, K]
        token_ce = -(teacher_probs.to(dtype) * log_p).sum(dim=-1)  # [M]
        return (token_ce * masks_weight.to(dtype)).sum() / n_crops
