"""The bench's batches: synthetic ones made on the device once, and the timing of the real loader alone.

Synthetic crops are drawn on the device itself and the same batch is handed to every step, so the
synthetic bench does no host work and no host-to-device copy per step: it times the step, not a stand-in
for the data pipeline (before, making random crops on the host took 10 % of a ViT-L/16 step on an H200).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from omegaconf import DictConfig

from dinolike.bench.device import sync


def synthetic_batch(cfg: DictConfig, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A batch with the collate's keys and shapes (random pixels, real block masks), on `device`."""
    from dinolike.data.masking import MaskSampler
    from dinolike.loss.ibot import ibot_masks_weight

    c, chans = cfg.crops, cfg.model.in_chans
    gen = torch.Generator(device=device).manual_seed(seed)
    g = torch.randn(2 * batch_size, chans, c.global_size, c.global_size, generator=gen,
                    device=device)  # [2B, C, H, W]
    loc = None
    if c.local_number:
        loc = torch.randn(c.local_number * batch_size, chans, c.local_size, c.local_size, generator=gen,
                          device=device)  # [n_local * B, C, h, w]
    grid = c.global_size // cfg.model.patch_size
    sampler = MaskSampler((grid, grid), cfg.masking.probability, tuple(cfg.masking.ratio))
    host_gen = torch.Generator().manual_seed(seed)  # the mask sampler draws on the host: once, here
    masks = torch.stack([sampler(host_gen).flatten() for _ in range(2 * batch_size)]).bool()  # [2B, N]
    mask_indices = masks.flatten().nonzero().flatten()  # [M]
    weights = ibot_masks_weight(masks)  # [M]
    return {
        "global_crops": g,
        "global_crops_teacher": g,
        "local_crops": loc,
        "masks": masks.to(device),
        "mask_indices": mask_indices.to(device),
        "masks_weight": weights.to(device),
        "n_masked": int(mask_indices.numel()),
        "labels": torch.zeros(batch_size, dtype=torch.long, device=device),
        "indices": torch.arange(batch_size, device=device),
        "positions": torch.arange(batch_size, device=device),
        "skipped": 0,
        "batch_size": batch_size,
    }


def loader_img_per_s(batches: Iterator[dict], n_batches: int) -> float:
    """Images per second of a loader alone (workers started, first batch not counted): the rate the
    data pipeline can feed, to hold against the step's own rate."""
    next(batches)  # worker start-up is not throughput
    n, t = 0, time.perf_counter()
    for _ in range(n_batches):
        n += next(batches)["batch_size"]
    return n / (time.perf_counter() - t)


def steps_img_per_s(step, batches: Iterator[dict], n_steps: int, device: torch.device) -> float:
    """Images per second of `n_steps` steps back to back, with one device sync at each end and none in
    between: the rate training runs at (the phase breakdown syncs around every phase, this does not)."""
    sync(device)
    n, t = 0, time.perf_counter()
    for i in range(n_steps):
        batch = next(batches)
        step(batch, i)
        n += batch["batch_size"]
    sync(device)
    return n / (time.perf_counter() - t)
