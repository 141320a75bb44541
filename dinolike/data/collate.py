"""Batch SSL samples (crop-major, with iBOT mask bookkeeping) and build the position-driven loader."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .positions import PositionBatchSampler, PositionSampler

__all__ = ["collate_ssl", "build_ssl_loader"]


def _crop_major(samples: list[dict[str, Any]], key: str) -> torch.Tensor | None:
    """Stack ``key`` crops as [n_crops * B, ...]: crop 0 of every image, then crop 1, ...

    Crop-major order lets the model split the batch per view with a reshape ([n_crops, B, ...]).
    """
    counts = {len(s[key]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"collate_ssl: samples disagree on the number of {key}: {sorted(counts)}")
    n = counts.pop()
    if n == 0:
        return None
    return torch.stack([s[key][k] for k in range(n) for s in samples])


def _empty_batch(skipped: list[int]) -> dict[str, Any]:
    return {
        "global_crops": None,
        "global_crops_teacher": None,
        "local_crops": None,
        "masks": None,
        "mask_indices": torch.zeros(0, dtype=torch.long),
        "masks_weight": torch.zeros(0),
        "n_masked": 0,
        "labels": torch.zeros(0, dtype=torch.long),
        "indices": torch.zeros(0, dtype=torch.long),
        "positions": torch.zeros(0, dtype=torch.long),
        "skipped": len(skipped),
        "skipped_indices": skipped,
        "batch_size": 0,
    }


def collate_ssl(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`~dinolike.data.positions.SSLDataset` samples, dropping (and counting) failed ones.

    Returns ``global_crops`` / ``global_crops_teacher`` [2B, C, H, W] and ``local_crops`` [n_local*B, C, h, w]
    (None without local crops), all crop-major; ``masks`` bool [2B, N] (None without a mask_fn);
    ``mask_indices`` [M] = flat indices of True in ``masks.flatten()``; ``masks_weight`` [M] with
    ``w = 1 / (masked tokens of that token's crop)`` so the iBOT loss averages per crop first, then over
    crops; ``n_masked`` = M; ``labels``, ``indices``, ``positions`` [B]; ``skipped`` (failed samples) and
    ``skipped_indices`` (their dataset indices, so that bad files can be counted once and named);
    ``batch_size`` = B; with an on-device augmentation also ``global_photometric`` / ``local_photometric``
    [n_crops * B, 14], the draws that finish the crops (crop-major, as the crops).
    A batch in which every sample failed comes back with ``batch_size == 0`` and None crops.
    """
    good = [s for s in samples if s.get("ok", True)]
    skipped = [int(s.get("index", -1)) for s in samples if not s.get("ok", True)]
    if not good:
        return _empty_batch(skipped)
    global_crops = _crop_major(good, "global_crops")
    if all(t is g for s in good for t, g in zip(s["global_crops_teacher"], s["global_crops"], strict=True)):
        teacher = global_crops  # same views (the DINOv2 recipe): share memory instead of copying
    else:
        teacher = _crop_major(good, "global_crops_teacher")
    local_crops = _crop_major(good, "local_crops")
    # photometric draws [n_crops * B, 14] of crops the training device finishes (data.augment_on_device)
    deferred = {k: _crop_major(good, k) for k in ("global_photometric", "local_photometric") if k in good[0]}

    masks = None
    mask_indices = torch.zeros(0, dtype=torch.long)
    masks_weight = torch.zeros(0)
    if good[0].get("masks") is not None:
        if any(s.get("masks") is None for s in good):
            raise ValueError("collate_ssl: some samples have masks and others do not")
        n_global = good[0]["masks"].shape[0]
        masks = torch.stack([s["masks"][k] for k in range(n_global) for s in good]).bool()  # [2B, N]
        mask_indices = masks.flatten().nonzero().flatten()  # [M]
        per_crop = masks.sum(dim=-1).clamp_min(1).float()  # [2B]
        masks_weight = (1.0 / per_crop)[:, None].expand_as(masks)[masks]  # [M]

    return {
        "global_crops": global_crops,
        "global_crops_teacher": teacher,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked": int(mask_indices.numel()),
        "labels": torch.tensor([int(s["label"]) for s in good], dtype=torch.long),
        "indices": torch.tensor([int(s.get("index", -1)) for s in good], dtype=torch.long),
        "positions": torch.tensor([int(s.get("position", -1)) for s in good], dtype=torch.long),
        "skipped": len(skipped),
        "skipped_indices": skipped,
        "batch_size": len(good),
        **deferred,
    }


def build_ssl_loader(
    dataset: Dataset,
    batch_size: int,
    start_position: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """Infinite loader over this rank's positions from ``start_position`` (batch k of this rank holds
    positions ``start + rank + world_size * (k*B + j)``, j < B); batches come in order.

    The loader gets its own torch.Generator so that starting it never draws from the caller's global RNG
    (DataLoader otherwise takes its worker base seed from it); samples are seeded per position anyway.
    Resume with ``start_position = iteration * batch_size * world_size``.
    """
    batches = PositionBatchSampler(PositionSampler(start_position, rank, world_size), batch_size)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_ssl,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
