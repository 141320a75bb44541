"""DINO image-level self-distillation loss: cross-entropy between teacher and student crop distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> Tensor:
    """Mean cross-entropy H(teacher crop t, student crop s) over crop pairs and images.

    Plain-loop definition (S student crops, T teacher crops, B images, K prototypes):
        total, n_pairs = 0, 0
        for s in range(S):
            for t in range(T):
                if ignore_diagonal and s == t:
                    continue                            # same view: nothing to predict
                for b in range(B):
                    log_p = log_softmax(student_logits[s, b] / student_temp)
                    total += -sum(teacher_probs[t, b, k] * log_p[k] for k in range(K))
                n_pairs += 1
        return total / (n_pairs * B)

    Vectorised: one einsum "sbk,tbk->st" over the log-softmaxed student and the teacher probabilities
    gives the [S, T] matrix of per-pair sums over images; the diagonal is masked out when requested.
    Computed in float32 (float64 stays float64) even under autocast.

    How the training loop calls it (2 global crops, n_local local crops, teacher sees globals only):
        local  = dino_loss(student_local_logits  [n_local, B, K], teacher_global_probs [2, B, K])
                 # all n_local * 2 pairs
        global = dino_loss(student_global_logits [2, B, K],       teacher_global_probs [2, B, K],
                           ignore_diagonal=True)
                 # 2 * (2 - 1) = 2 pairs: student crop i vs teacher crop j != i
    Each call is a mean over its own pairs; weight them by their pair counts to average over all pairs:
    (local * 2 * n_local + global * 2) / (2 * n_local + 2). DINOv2 additionally doubles the global
    term's numerator (its `loss_scales = 2`): (local * 2 * n_local + global * 2 * 2) / (2 * n_local + 2).

    Args:
        student_logits: [S, B, K] student prototype logits (gradients flow here).
        teacher_probs: [T, B, K] teacher target distributions (rows sum to 1; treated as constants only
            if the caller detaches them, which it should).
        student_temp: student softmax temperature.
        ignore_diagonal: skip pairs with s == t (same crop index); S and T then need >= 2 pairs left.
    Returns:
        scalar loss.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            "dino_loss: expected student [S, B, K] and teacher [T, B, K], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    n_s, batch, n_protos = student_logits.shape
    n_t = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (batch, n_protos):
        raise ValueError(
            "dino_loss: batch / prototype dims differ: student "
            f"{tuple(student_logits.shape)} vs teacher {tuple(teacher_probs.shape)}"
        )
    if not student_temp > 0:
        raise ValueError(f"dino_loss: student_temp must be > 0, got {student_temp}")
    n_diag = min(n_s, n_t) if ignore_diagonal else 0
    n_pairs = n_s * n_t - n_diag
    if n_pairs == 0 or batch == 0:
        raise ValueError(
            f"dino_loss: no (student, teacher) pair to compare (S={n_s}, T={n_t}, B={batch}, "
            f"ignore_diagonal={ignore_diagonal})"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        dtype = torch.promote_types(student_logits.dtype, teacher_probs.dtype)
        dtype = torch.promote_types(dtype, torch.float32)
        log_p = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)  # [S, B, K]
        cross = torch.einsum("sbk,tbk->st", log_p, teacher_probs.to(dtype))  # [S, T]
        if ignore_diagonal:
            diag = torch.eye(n_s, n_t, dtype=torch.bool, device=cross.device)  # [S, T]
            cross = cross.masked_fill(diag, 0.0)  # [S, T]
        return -cross.sum() / (n_pairs * batch)
