"""Frozen-feature extraction: what training's periodic kNN and every eval protocol run the backbone with.

One forward pass stores everything the protocols need (CLS tokens of the last few blocks and the
average-pooled patch tokens of the last block), so kNN, the linear probe and logistic regression can
all reuse the same features (the eval commands cache them on disk: `eval/feature_cache.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinolike.errors import DinolikeError

log = logging.getLogger(__name__)

KNN_FEATURES = ("cls", "cls+patches")  # eval.knn.features


class FeatureError(DinolikeError, RuntimeError):
    """Extraction cannot produce features (e.g. no image of the dataset decodes); shown without traceback."""


def check_knn_features(kind: str) -> str:
    """`kind` if it names a kNN representation (eval.knn.features), else a one-line FeatureError."""
    if kind not in KNN_FEATURES:
        raise FeatureError(f"eval.knn.features={kind!r}: one of {' | '.join(KNN_FEATURES)}")
    return kind


@dataclass
class FeatureSet:
    """Features of one dataset: what the protocols consume.

    cls: [N, L, D] normalised CLS tokens of the last L blocks (oldest first; cls[:, -1] is the final one).
    patch_mean: [N, D] average of the last block's normalised patch tokens, or None (raw pixels).
    labels: [N] int64 class ids. skipped: items the dataset could not decode (counted, not fatal).
    index: [N] int64 dataset index of each row (rows of skipped items are absent), or None (an older cache).
    """

    cls: Tensor
    patch_mean: Tensor | None
    labels: Tensor
    skipped: int = 0
    index: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.cls.shape[1])

    def knn_features(self, kind: str = "cls") -> Tensor:
        """The kNN representation: "cls", the final normalised CLS token [N, D] (the DINO protocol), or
        "cls+patches", that token and the pooled patch tokens, each L2-normalised, side by side [N, 2D].

        With "cls+patches" the cosine of two images is the mean of their CLS and patch-mean cosines: the
        patch tokens carry what iBOT trains, which the CLS token alone leaves out of the kNN vote.
        """
        if check_knn_features(kind) == "cls":
            return self.cls[:, -1]
        if self.patch_mean is None:
            raise FeatureError("kNN features 'cls+patches' need patch tokens; these features have none (raw pixels)")
        return torch.cat([F.normalize(self.cls[:, -1].float(), dim=1), F.normalize(self.patch_mean.float(), dim=1)],
                         dim=1)  # [N, 2D]

    def linear_input(self, n_last_blocks: int, avgpool: bool) -> Tensor:
        """DINOv2 linear-probe input: concat of the last n CLS tokens (+ pooled patches) -> [N, n*D (+D)]."""
        if n_last_blocks > self.n_blocks:
            raise ValueError(f"asked for the last {n_last_blocks} blocks but only {self.n_blocks} stored")
        parts = [self.cls[:, -n_last_blocks:].flatten(1)]  # [N, n*D]
        if avgpool:
            if self.patch_mean is None:
                raise ValueError("these features have no patch tokens (raw pixels?): avgpool unavailable")
            parts.append(self.patch_mean)  # [N, D]
        return torch.cat(parts, dim=1).float()

    def subset(self, idx: Tensor) -> FeatureSet:
        """The rows `idx` [M] of this set (a few-label split of the labelled train features)."""
        pm = None if self.patch_mean is None else self.patch_mean[idx]
        return FeatureSet(self.cls[idx], pm, self.labels[idx], 0, None if self.index is None else self.index[idx])

    def to_dict(self) -> dict[str, Any]:
        return {
            "cls": self.cls,
            "patch_mean": self.patch_mean,
            "labels": self.labels,
            "skipped": self.skipped,
            "index": self.index,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSet:
        return cls(d["cls"], d["patch_mean"], d["labels"], int(d.get("skipped", 0)), d.get("index"))


# ----------------------------------------------------------------------------------------------- batches


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _IndexedTransformed(Dataset):
    """Applies the eval transform in the loader workers and keeps the dataset index (for gathering)."""

    def __init__(self, base: Any, indices: list[int], transform: Callable[[Any], Tensor]):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, int]:
        idx = self.indices[i]
        try:
            img, label = self.base[idx]
        except (OSError, ValueError) as e:  # unreadable file: a counted skip, not a crash
            log.warning("skipping item %d: %s", idx, e)
            return None, -1, idx
        if img is None:
            return None, int(label), idx
        return self.transform(img), int(label), idx


def _collate(items: list[tuple[Tensor | None, int, int]]) -> tuple[Tensor | None, Tensor, Tensor, int]:
    kept = [it for it in items if it[0] is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([it[0] for it in kept])  # [B, C, H, W]
    y = torch.tensor([it[1] for it in kept], dtype=torch.long)
    idx = torch.tensor([it[2] for it in kept], dtype=torch.long)
    return x, y, idx, skipped


def tensor_fast_path(dataset: Any, resolution: int, resize: int) -> bool:
    """True when the dataset holds uint8 images already at the eval size (Fashion-MNIST at 28 px).

    Then eval preprocessing is just scaling + normalisation and PIL can be bypassed (10x faster).
    """
    images = getattr(dataset, "images", None)
    if not isinstance(images, (Tensor, np.ndarray)) or images.dtype not in (torch.uint8, np.uint8):
        return False
    if images.ndim != 3 or len(images) != len(dataset):
        return False
    return images.shape[1] == images.shape[2] == resolution == resize


def iterate_batches(
    dataset: Any,
    transform: Callable[[Any], Tensor],
    *,
    batch_size: int,
    num_workers: int,
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resolution: int,
    resize: int,
    indices: list[int],
) -> Iterator[tuple[Tensor | None, Tensor, Tensor, int]]:
    """Yield (images [B, C, H, W], labels [B], dataset indices [B], n skipped) over `indices`."""
    if tensor_fast_path(dataset, resolution, resize):
        images = torch.from_numpy(np.array(dataset.images, dtype=np.uint8, copy=True))  # [N, H, W]
        labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)  # [N]
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        idx_all = torch.as_tensor(indices, dtype=torch.long)
        for start in range(0, len(indices), batch_size):
            idx = idx_all[start : start + batch_size]
            x = images[idx].float().div_(255.0).unsqueeze(1)  # [B, 1, H, W]
            x = x.expand(-1, channels, -1, -1)  # [B, C, H, W] (gray replicated, as PIL's RGB convert)
            yield (x - m) / s, labels[idx], idx, 0
        return
    loader = DataLoader(
        _IndexedTransformed(dataset, indices, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    yield from loader


# ------------------------------------------------------------------------------------------- extraction


@torch.no_grad()
def _model_batch(model: nn.Module, x: Tensor, n_last: int) -> tuple[Tensor, Tensor]:
    """CLS tokens of the last n blocks [B, n, D] and pooled last-block patch tokens [B, D]."""
    outs = model.get_intermediate_layers(x, n=n_last, return_class_token=True, norm=True)
    cls = torch.stack([c for _, c in outs], dim=1)  # [B, n, D]
    patch_mean = outs[-1][0].mean(dim=1)  # [B, D]
    return cls, patch_mean


def _gather_across_ranks(parts: dict[str, Tensor], n_total: int) -> dict[str, Tensor]:
    """All-gather per-rank rows (unequal counts) and put them back in dataset order."""
    rank, world = dist_info()
    if world == 1:
        order = parts["index"].argsort()
        return {k: v[order] for k, v in parts.items()}
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    count = torch.tensor([parts["index"].shape[0]], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    max_n = int(max(c.item() for c in counts))
    out: dict[str, Tensor] = {}
    for key, val in parts.items():
        v = val.to(dev) if dev is not None else val
        pad = v.new_zeros((max_n - v.shape[0], *v.shape[1:]))
        buf = [v.new_zeros((max_n, *v.shape[1:])) for _ in range(world)]
        dist.all_gather(buf, torch.cat([v, pad]).contiguous())
        out[key] = torch.cat([b[: int(c.item())] for b, c in zip(buf, counts, strict=True)]).cpu()
    order = out["index"].argsort()
    if out["index"].shape[0] and int(out["index"].max().item()) >= n_total:
        raise FeatureError("gathered feature indices exceed the dataset size: ranks disagree on the dataset")
    return {k: v[order] for k, v in out.items()}


def extract_features(
    model: nn.Module | None,
    dataset: Any,
    transform: Callable[[Any], Tensor],
    *,
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resolution: int,
    resize: int,
    n_last_blocks: int = 4,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Run the frozen backbone (or take raw pixels when model is None) over the whole dataset.

    Distributed-aware: with torch.distributed initialised each rank processes indices rank::world and
    the shards are all-gathered, so every rank returns the full, ordered FeatureSet.
    """
    from tqdm import tqdm

    rank, world = dist_info()
    n_total = len(dataset)
    indices = list(range(rank, n_total, world))
    device = torch.device(device)
    n_last = 1
    was_training = bool(model is not None and model.training)
    if model is not None:
        model = model.eval().to(device)
        n_last = max(1, min(n_last_blocks, int(getattr(model, "n_blocks", n_last_blocks))))
    use_amp = device.type == "cuda"
    cls_parts, pm_parts, lab_parts, idx_parts = [], [], [], []
    skipped = 0
    batches = iterate_batches(
        dataset,
        transform,
        batch_size=batch_size,
        num_workers=num_workers,
        channels=channels,
        mean=mean,
        std=std,
        resolution=resolution,
        resize=resize,
        indices=indices,
    )
    n_batches = (len(indices) + batch_size - 1) // batch_size
    for x, y, idx, n_skip in tqdm(batches, total=n_batches, desc=desc, disable=not progress or rank != 0, leave=False):
        skipped += n_skip
        if x is None:
            continue
        if model is None:
            cls_parts.append(x.flatten(1).unsqueeze(1).float())  # [B, 1, C*H*W]
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                cls, pm = _model_batch(model, x.to(device, non_blocking=True), n_last)
            cls_parts.append(cls.float().cpu())
            pm_parts.append(pm.float().cpu())
        lab_parts.append(y)
        idx_parts.append(idx)
    if model is not None:
        model.train(was_training)  # the periodic kNN runs mid-training: leave the mode as we found it
    if not cls_parts:
        raise FeatureError(f"{desc}: no decodable images ({skipped} skipped of {len(indices)})")
    parts = {
        "cls": torch.cat(cls_parts),
        "labels": torch.cat(lab_parts),
        "index": torch.cat(idx_parts),
    }
    if pm_parts:
        parts["patch_mean"] = torch.cat(pm_parts)
    parts = _gather_across_ranks(parts, n_total)
    if world > 1:
        sk = torch.tensor([skipped], dtype=torch.long)
        if dist.get_backend() == "nccl":
            sk = sk.cuda()
        dist.all_reduce(sk)
        skipped = int(sk.item())
    if skipped:
        log.warning("%s: skipped %d undecodable items of %d", desc, skipped, n_total)
    return FeatureSet(parts["cls"], parts.get("patch_mean"), parts["labels"], skipped, parts["index"])
