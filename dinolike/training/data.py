"""From the `data:`, `crops:` and `masking:` config sections to the training data loader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from dinolike import dist
from dinolike.data.augment import MultiCropAugmentation
from dinolike.data.collate import build_ssl_loader
from dinolike.data.datasets import build_dataset, check_readable
from dinolike.data.masking import MaskSampler
from dinolike.data.positions import SSLDataset
from dinolike.training.method import Method
from dinolike.training.skips import SkipGuard


def build_augmentation(cfg: DictConfig) -> MultiCropAugmentation:
    c, d = cfg.crops, cfg.data
    return MultiCropAugmentation(
        global_crops_size=c.global_size,
        local_crops_size=c.local_size,
        global_crops_scale=tuple(c.global_scale),
        local_crops_scale=tuple(c.local_scale),
        local_crops_number=c.local_number,
        mean=tuple(d.mean),
        std=tuple(d.std),
        channels=d.channels,
        flip_p=c.flip_p,
        jitter_p=c.jitter_p,
        jitter=tuple(c.jitter),
        gray_p=c.gray_p,
        blur_p=tuple(c.blur_p),
        solarize_p=tuple(c.solarize_p),
        crop_ratio=tuple(c.ratio),
        photometric_on_device=d.augment_on_device,
    )


def build_batch_mover(cfg: DictConfig, device: torch.device) -> Callable[[dict], dict]:
    """Collated batch -> the batch the step reads, on `device`: copied there (a tensor shared by two keys
    once), then finished there when `data.augment_on_device` (colour jitter, blur, solarize over the whole
    batch, which the loader workers left undone). The loop and the bench both use it."""
    aug = build_augmentation(cfg) if cfg.data.augment_on_device else None

    def move(batch: dict) -> dict:
        on_device = Method.to_device(batch, device)
        return aug.finish_batch(on_device) if aug is not None else on_device

    return move


def build_train_loader(cfg: DictConfig, env: dist.DistEnv, start_position: int) -> DataLoader:
    """Batches of global positions start_position, start_position + 1, ...: the position is the state.

    Files on disk are probed first: a dataset without one readable image fails here, before training,
    instead of "training" on empty batches and exporting an untrained model."""
    base = build_dataset(cfg.data.train, channels=cfg.data.channels, limit=cfg.data.limit,
                         shard_window=cfg.data.shard_window)
    if getattr(base, "paths", None) is not None:
        check_readable(base.paths, cfg.data.train, cfg.data.channels, seed=cfg.run.seed)
    grid = cfg.crops.global_size // cfg.model.patch_size
    masks = MaskSampler((grid, grid), cfg.masking.probability, tuple(cfg.masking.ratio))
    ds = SSLDataset(base, build_augmentation(cfg), seed=cfg.run.seed, mask_fn=masks)
    return build_ssl_loader(
        ds,
        batch_size=cfg.data.batch_size,
        start_position=start_position,
        num_workers=cfg.data.num_workers,
        rank=env.rank,
        world_size=env.world_size,
        pin_memory=cfg.data.pin_memory and env.device.type == "cuda",
    )


def build_skip_guard(cfg: DictConfig, loader: DataLoader) -> SkipGuard:
    """The unreadable-image limit of this run; the window is never longer than one pass over the data,
    so a small dataset is judged on (about) each of its files once."""
    base = loader.dataset.base
    paths = getattr(base, "paths", None)
    name_of = getattr(base, "name_of", None)  # shards: "DIR/shard-000012.tar member 345"
    if name_of is None:
        name_of = (lambda i: paths[i]) if paths is not None else (lambda i: f"item {i}")
    window = cfg.data.skip_window
    return SkipGuard(cfg.data.max_skipped_fraction, window, min(window, len(base)), name_of=name_of)


def grey_scale_warning(cfg: DictConfig) -> str | None:
    """A warning when a 1-channel recipe (made for 28 px Fashion-MNIST) is about to train on photos: the
    first image of data.train is colour, or larger than the global crop. None for grey-scale images of
    the crop's size (Fashion-MNIST itself, or its images as files: a manifest, the curation demo pool)."""
    from dinolike.data.datasets import first_image

    if cfg.model.in_chans != 1 or str(cfg.data.train).startswith("fmnist"):
        return None
    found = first_image(str(cfg.data.train))
    if found is None:  # unreadable or no image: training reports it, in its own words
        return None
    path, mode, size = found
    crop = int(cfg.crops.global_size)
    if mode in ("1", "L", "LA", "I", "I;16", "F") and max(size) <= crop:
        return None
    return (f"data.train={cfg.data.train} is read as 1-channel grey-scale images cropped to {crop} px (a "
            f"Fashion-MNIST recipe), but {path} is a {size[0]}x{size[1]} {mode} image; for RGB images use "
            "configs/folder_vits14.yaml")


def check_data_exists(spec: str, key: str = "data.train") -> None:
    """The folder or list file a spec names exists: checked before any work (`validate` may not read the
    disk, a job is checked where its files may not be); ConfigError in one line, not a DataError later."""
    from dinolike.config import ConfigError
    from dinolike.data.datasets import parse_spec

    scheme, rest = parse_spec(str(spec))
    if scheme == "fmnist":
        return
    path = Path(rest).expanduser()
    kind = "list file" if scheme == "manifest" else "folder"
    if not path.exists():
        raise ConfigError(f"{key}={spec}: {kind} not found: {path}")
    if (scheme == "manifest") == path.is_dir():
        raise ConfigError(f"{key}={spec}: {path} is a {'folder' if path.is_dir() else 'file'}, not a {kind}")
