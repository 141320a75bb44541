"""Can the data loader keep up with the GPU step at 224 px? Decode + DINOv2 augmentation per worker.

  nice -n 19 python benchmarks/bench_loader.py                        # 500 JPEGs in /tmp, workers 1 and 2
  nice -n 19 python benchmarks/bench_loader.py --dir /data/jpegs --workers 1 2 4 8 --target 300
  nice -n 19 python benchmarks/bench_loader.py --shards /tmp/dinolike_jpeg_shards   # + the same images as shards

Generates (once) a folder of JPEGs of an ImageNet-like size (500 x 375, smooth random content, quality
90), then measures on this machine:
- per worker, in this process on one thread (what one DataLoader worker gets): decode alone, decode +
  the recipe's multi-crop augmentation (configs/base.yaml: 2 x 224 + 8 x 96 crops, jitter, blur,
  solarize, normalise) + iBOT masks, and decode + the loader's half of it (crop, resize, flip: what a
  worker does under `data.augment_on_device`) + masks, images per second;
- the real training loader (`build_train_loader` on `folder-nolabels:DIR`: dataset, augmentation,
  masks, collate, worker processes) for each worker count;
and prints the workers the target img/s (the step's rate; the issue's goal is 300 for ViT-L/16) needs
at the per-worker rate. Only CPU work is measured: no GPU is touched.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dinolike.bench.batches import loader_img_per_s
from dinolike.config import load_config
from dinolike.data.datasets import build_dataset
from dinolike.data.masking import MaskSampler
from dinolike.dist import DistEnv
from dinolike.training.data import build_augmentation, build_train_loader

REPO = Path(__file__).resolve().parent.parent


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> None:
    """n JPEGs of `size` (w, h): low-resolution noise upsampled, so they compress like photos, not noise."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(seed)
    for i in range(have, n):
        small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"img_{i:05d}.jpg", quality=90)


def per_worker_rates(cfg, seconds: float) -> list[tuple[float, float]]:
    """Decode; decode + augment + masks; and decode + the loader's half of the augmentation + masks (what
    a worker does under `data.augment_on_device`), on one thread of this process: each (img per wall
    second, img per CPU second)."""
    base = build_dataset(cfg.data.train, channels=cfg.data.channels)
    aug, half = (build_augmentation(OmegaConf.merge(cfg, {"data": {"augment_on_device": on}})) for on in (False, True))
    grid = cfg.crops.global_size // cfg.model.patch_size
    masks = MaskSampler((grid, grid), cfg.masking.probability, tuple(cfg.masking.ratio))
    gen = torch.Generator().manual_seed(0)

    def rate(fn) -> tuple[float, float]:
        fn(0)  # first-call costs (imports, allocations) are not throughput
        n, t, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t < seconds:
            fn(n % len(base))
            n += 1
        # per CPU-second: what one uncontended core gives (the stabler figure on shared cores)
        return n / (time.perf_counter() - t), n / max(time.process_time() - cpu, 1e-9)

    decode = rate(lambda i: base[i][0].load())

    def full(i: int, aug=aug) -> None:
        img, _ = base[i]
        aug(img, gen)
        for _ in range(2):
            masks(gen)

    return [decode, rate(full), rate(lambda i: full(i, half))]


def loader_rate(cfg, batches: int) -> float:
    """img/s of the training loader itself (workers started, first batch not counted)."""
    loader = iter(build_train_loader(cfg, DistEnv(0, 1, 0, torch.device("cpu")), start_position=0))
    try:
        return loader_img_per_s(loader, batches)
    finally:
        del loader  # its workers end here


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dinolike_jpegs"), help="JPEG folder (made if empty)")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                   help="loader worker counts (none: the per-worker rates only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    p.add_argument("--seconds", type=float, default=10.0, help="timing window of each per-worker rate")
    p.add_argument("--target", type=float, default=300.0, help="img/s the loader must sustain")
    p.add_argument("--config", default=str(REPO / "configs" / "base.yaml"))
    p.add_argument("--shards", type=Path, default=None,
                   help="also measure the same images as shards (`shards:DIR`, written there once)")
    p.add_argument("overrides", nargs="*", help="config overrides (crops.*, model.patch_size, ...)")
    args = p.parse_args(argv)

    make_jpegs(args.dir, args.images)
    specs = [f"folder-nolabels:{args.dir}"]
    if args.shards is not None:
        if not (args.shards / "index.json").exists():
            from dinolike.data.shard_writer import ShardConfig, write_shards

            write_shards(ShardConfig(source=f"folder-nolabels:{args.dir}", out=str(args.shards), shard_size=100))
        specs.append(f"shards:{args.shards}")
    for spec in specs:
        print(f"\n## data.train={spec}")
        run(args, spec)
    return 0


def run(args: argparse.Namespace, spec: str) -> None:
    """The per-worker rates and the training loader's rate on one data spec."""
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"data.train={spec}", "data.pin_memory=false",
                                    f"data.batch_size={args.batch_size}", "run.device=cpu", *args.overrides])
    c = cfg.crops
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{len(list(args.dir.glob('*.jpg')))} JPEGs 500x375 in {args.dir}; crops 2 x {c.global_size} + "
          f"{c.local_number} x {c.local_size} px, patch {cfg.model.patch_size}")
    (decode, decode_cpu), (full, full_cpu), (half, half_cpu) = per_worker_rates(cfg, args.seconds)
    print("\n| measure | img/s | img per CPU-second |\n|---|---|---|")
    print(f"| decode only, 1 thread | {decode:.1f} | {decode_cpu:.1f} |")
    print(f"| decode + augmentation + masks, 1 thread (one worker) | {full:.1f} | {full_cpu:.1f} |")
    print(f"| decode + crop / resize / flip + masks, 1 thread (one worker, `data.augment_on_device`) | {half:.1f} "
          f"| {half_cpu:.1f} |")
    for w in args.workers:
        wcfg = load_config(args.config, [f"data.train={spec}", "data.pin_memory=false",
                                         f"data.batch_size={args.batch_size}", "run.device=cpu",
                                         f"data.num_workers={w}", *args.overrides])
        r = loader_rate(wcfg, args.batches)
        where = " (photometric half left to the device)" if wcfg.data.augment_on_device else ""
        print(f"| training loader{where}, {w} worker(s), batch {args.batch_size} | {r:.1f} ({r / w:.1f} per worker) "
              "| - |")
    print(f"\nworkers for {args.target:.0f} img/s: {math.ceil(args.target / full_cpu)} at {full_cpu:.1f} img per "
          f"CPU-second each ({math.ceil(args.target / full)} at the {full:.1f} img/s measured here; one core "
          "per worker, loader overheads aside)")
    print(f"with data.augment_on_device: {math.ceil(args.target / half_cpu)} at {half_cpu:.1f} img per CPU-second "
          "(the photometric half then runs on the training device)")


if __name__ == "__main__":
    raise SystemExit(main())
