"""Throughput of the multi-crop augmentation: ours (batched tensors) vs torchvision PIL and v2-tensor.

Usage (from the repo root):
    PYTHONPATH=. .venv/bin/python benchmarks/bench_augment.py                 # all configs, 1 thread
    PYTHONPATH=. .venv/bin/python benchmarks/bench_augment.py --configs fmnist --loader-workers 0 1 2

Prints images/second for each (config, implementation) measured in this process with
``torch.set_num_threads(1)`` (what one DataLoader worker gets), and optionally the end-to-end SSL loader
throughput (SSLDataset + iBOT masks + collate) for several worker counts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dinolike.data import FashionMNIST, MaskSampler, MultiCropAugmentation, SSLDataset, build_ssl_loader
from dinolike.data.augment_ops import blur_kernel_size
from dinolike.data.normalize import default_stats


@dataclass(frozen=True)
class Config:
    name: str
    global_size: int
    local_size: int
    n_local: int
    channels: int
    patch: int  # for the iBOT mask grid of the loader benchmark
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)


CONFIGS = {
    # configs/fmnist_cpu.yaml: 2 x 28 px + 4 x 12 px.
    "fmnist": Config("fmnist", 28, 12, 4, 1, 4, (0.4, 1.0), (0.1, 0.4)),
    "fmnist-heavy": Config("fmnist-heavy", 28, 16, 6, 1, 4),
    "rgb224": Config("rgb224", 224, 96, 8, 3, 14),
}


def _images(cfg: Config, n: int) -> list[Image.Image]:
    if cfg.channels == 1:
        ds = FashionMNIST(limit=n)
        return [ds[i][0] for i in range(len(ds))]
    rng = np.random.default_rng(0)
    # Smooth-ish random photos of a typical ImageNet size (content does not change the cost much).
    base = rng.integers(0, 256, size=(n, 48, 64, 3), dtype=np.uint8)
    return [Image.fromarray(b).resize((500, 375), Image.BILINEAR) for b in base]


def _torchvision_pil(cfg: Config) -> Callable[[Image.Image], dict]:
    """The DINOv2 recipe written with classic torchvision transforms on PIL images (one crop at a time)."""
    from torchvision import transforms as T

    mean, std = default_stats(cfg.channels)

    def pipeline(size: int, scale: tuple[float, float], blur_p: float, sol_p: float) -> T.Compose:
        k = blur_kernel_size(size)
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_p),
            T.RandomSolarize(128, p=sol_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    g1 = pipeline(cfg.global_size, cfg.global_scale, 1.0, 0.0)
    g2 = pipeline(cfg.global_size, cfg.global_scale, 0.1, 0.2)
    loc = pipeline(cfg.local_size, cfg.local_scale, 0.5, 0.0)
    n_loc = cfg.n_local

    def run(img: Image.Image) -> dict:
        gl = [g1(img), g2(img)]
        return {"global_crops": gl, "global_crops_teacher": gl, "local_crops": [loc(img) for _ in range(n_loc)]}

    return run


def _torchvision_v2_tensor(cfg: Config) -> Callable[[Image.Image], dict]:
    """Same recipe with torchvision.transforms.v2 on uint8 tensors (one crop at a time)."""
    from torchvision.transforms import v2

    mean, std = default_stats(cfg.channels)

    def pipeline(size: int, scale: tuple[float, float], blur_p: float, sol_p: float) -> v2.Compose:
        k = blur_kernel_size(size)
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(128, p=sol_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])

    g1 = pipeline(cfg.global_size, cfg.global_scale, 1.0, 0.0)
    g2 = pipeline(cfg.global_size, cfg.global_scale, 0.1, 0.2)
    loc = pipeline(cfg.local_size, cfg.local_scale, 0.5, 0.0)
    n_loc = cfg.n_local

    def run(img: Image.Image) -> dict:
        arr = torch.from_numpy(np.array(img))
        t = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
        gl = [g1(t), g2(t)]
        return {"global_crops": gl, "global_crops_teacher": gl, "local_crops": [loc(t) for _ in range(n_loc)]}

    return run


def _make_aug(cfg: Config) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        cfg.global_size, cfg.local_size, cfg.global_scale, cfg.local_scale, cfg.n_local, channels=cfg.channels
    )


def _ours(cfg: Config) -> Callable[[Image.Image], dict]:
    aug = _make_aug(cfg)
    gen = torch.Generator().manual_seed(0)
    return lambda img: aug(img, gen)


IMPLS = {"ours": _ours, "tv-pil": _torchvision_pil, "tv-v2-tensor": _torchvision_v2_tensor}


def bench_transform(
    fn: Callable[[Image.Image], dict], images: list[Image.Image], seconds: float
) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of ``fn`` over ``images``, cycled for ``seconds``.

    The CPU-second rate is what one uncontended core would give; it is the stabler number on a shared box.
    """
    for img in images[:10]:
        fn(img)
    n, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        for img in images:
            fn(img)
        n += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, n / max(time.process_time() - cpu_start, 1e-9)


def bench_loader(cfg: Config, workers: int, batch_size: int, n_batches: int, limit: int) -> float:
    """End-to-end images/second of the SSL loader (dataset + augmentation + masks + collate)."""
    if cfg.channels == 1:
        base = FashionMNIST(limit=limit)
    else:
        imgs = _images(cfg, 64)

        class _Mem:
            def __len__(self) -> int:
                return len(imgs)

            def __getitem__(self, i: int) -> tuple[Image.Image, int]:
                return imgs[i], 0

        base = _Mem()
    aug = _make_aug(cfg)
    grid = cfg.global_size // cfg.patch
    ds = SSLDataset(base, aug, seed=0, mask_fn=MaskSampler((grid, grid)))
    it = iter(build_ssl_loader(ds, batch_size, 0, num_workers=workers))
    next(it)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    for _ in range(n_batches):
        n += next(it)["batch_size"]
    rate = n / (time.perf_counter() - start)
    del it
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--images", type=int, default=200, help="distinct images per config")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timing window per measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loader-workers", type=int, nargs="*", default=[], help="also time the SSL loader")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}")
    for name in args.configs:
        cfg = CONFIGS[name]
        images = _images(cfg, args.images if cfg.channels == 1 else min(args.images, 32))
        desc = (
            f"{cfg.name}: 2x{cfg.global_size}px + {cfg.n_local}x{cfg.local_size}px, "
            f"{cfg.channels} ch, input {images[0].size[0]}x{images[0].size[1]}"
        )
        print(desc)
        for impl in args.impls:
            rate, cpu_rate = bench_transform(IMPLS[impl](cfg), images, args.seconds)
            print(f"  {impl:14s} {rate:8.0f} img/s  {cpu_rate:8.0f} img/cpu-s")
        for w in args.loader_workers:
            rate = bench_loader(cfg, w, args.batch_size, args.batches, limit=5000)
            print(f"  loader workers={w}: {rate:6.0f} img/s (SSLDataset+masks+collate, batch {args.batch_size})")


if __name__ == "__main__":
    main()
