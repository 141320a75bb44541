"""Per-core rate of a loader worker on the same JPEGs read from a folder and from shards, interleaved.

  nice -n 19 python benchmarks/bench_shard_decode.py      # the 500 JPEGs and shards bench_loader.py made

One thread, this process (what one DataLoader worker does): item i of the data set, decoded, through the
recipe's multi-crop augmentation (configs/base.yaml: 2 x 224 + 8 x 96 crops) and iBOT masks. The two
readers alternate in rounds so that both see the same load on shared cores; reported per CPU-second.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from dinolike.config import load_config
from dinolike.data.datasets import build_dataset
from dinolike.data.masking import MaskSampler
from dinolike.training.data import build_augmentation

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/dinolike_jpegs")
    p.add_argument("--shards", default="/tmp/dinolike_jpeg_shards")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--items", type=int, default=40, help="images per reader per round")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "base.yaml", ["run.device=cpu"])
    aug = build_augmentation(cfg)
    grid = cfg.crops.global_size // cfg.model.patch_size
    masks = MaskSampler((grid, grid), cfg.masking.probability, tuple(cfg.masking.ratio))
    readers = {"folder": build_dataset(f"folder-nolabels:{args.dir}"), "shards": build_dataset(f"shards:{args.shards}")}
    cpu = {k: 0.0 for k in readers}
    decode = {k: 0.0 for k in readers}
    gen = torch.Generator().manual_seed(0)
    for r in range(args.rounds):
        for name, ds in readers.items():
            t = time.process_time()
            for i in range(r * args.items, (r + 1) * args.items):
                ds[i % len(ds)][0].load()
            decode[name] += time.process_time() - t
            t = time.process_time()
            for i in range(r * args.items, (r + 1) * args.items):
                aug(ds[i % len(ds)][0], gen)
                masks(gen), masks(gen)
            cpu[name] += time.process_time() - t
    n = args.rounds * args.items
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {model}, {os.cpu_count()} cores (shared with other work); {n} images per reader, interleaved")
    print("| reader | decode, img per CPU-second | decode + augmentation + masks, img per CPU-second |\n|---|---|---|")
    for name in readers:
        print(f"| {name} | {n / decode[name]:.1f} | {n / cpu[name]:.1f} |")


if __name__ == "__main__":
    main()
