"""Start-up and memory of the training data at 10M / 100M items: shards vs the folder and manifest readers.

  nice -n 19 python benchmarks/bench_scale_data.py                      # shards at 10M and 100M, folder
                                                                        # at 100k files, manifest at 1M lines
  nice -n 19 python benchmarks/bench_scale_data.py --shards 1e6 --folder 20000 --manifest 100000   # quicker

What one rank does before its first batch, timed from building the data set to the first batch off the
real training loader (`build_train_loader`: dataset, SSLDataset positions, augmentation, masks, collate,
2 worker processes), resumed in the middle of epoch 0 (start position N/2) so no code can lean on
position 0. RSS growth is measured for the rank (main process) and for each loader worker from /proc.

Synthetic data where the format allows: ONE real shard of 10,000 tiny PNGs and its offset sidecar,
listed S times in index.json through symlinks (S = N / 10,000 shards), so the index, the shard order
and the start-up check are those of an N-item data set, and every item read decodes a real image. The
folder reader gets real files (a tree of tiny PNGs); the manifest reader N lines that all name one real
file (its listing cost is per line, not per distinct file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dinolike.config import load_config
from dinolike.data.shard_writer import ShardConfig, write_shards
from dinolike.data.shards import sidecar_name
from dinolike.dist import DistEnv
from dinolike.training.data import build_train_loader

REPO = Path(__file__).resolve().parent.parent
PER_SHARD = 10_000


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def tiny_pngs(root: Path, n: int) -> Path:
    """n 16x16 PNGs in sub-folders of 1000 (a tree like a real photo folder)."""
    if (root / ".done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"{i // 1000:05d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:08d}.png")
    (root / ".done").touch()
    return root


def synthetic_shards(work: Path, n_items: int) -> Path:
    """index.json of n_items items: one real 10,000-item shard behind n_items / 10,000 symlinks."""
    real = work / "real_shard"
    if not (real / "index.json").exists():
        write_shards(ShardConfig(source=str(tiny_pngs(work / "pngs", PER_SHARD)), out=str(real),
                                 shard_size=PER_SHARD, check=False))
    index = json.loads((real / "index.json").read_text())
    entry = index["shardlist"][0]
    out = work / f"shards_{n_items}"
    n_shards = n_items // PER_SHARD
    if not (out / "index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for s in range(n_shards):
            name = f"shard-{s:06d}.tar"
            os.symlink(real / entry["url"], out / name)
            os.symlink(real / sidecar_name(entry["url"]), out / sidecar_name(name))
        shardlist = [{**entry, "url": f"shard-{s:06d}.tar"} for s in range(n_shards)]
        (out / "index.json").write_text(json.dumps({**index, "shardlist": shardlist}))
    return out


def first_batch(spec: str, n_items: int, workers: int) -> dict[str, float]:
    """The training loader of one rank on `spec`, resumed at position n_items // 2."""
    cfg = load_config(REPO / "configs" / "base.yaml", [
        f"data.train={spec}", f"data.num_workers={workers}", "data.batch_size=8", "data.channels=3",
        "crops.global_size=28", "crops.local_size=14", "crops.local_number=2", "model.patch_size=14",
        "data.pin_memory=false"])
    env = DistEnv()  # one rank on the CPU: what every rank of a cluster run does
    rss0 = rss_mb()
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, env, start_position=n_items // 2)
    t_built = time.perf_counter() - t0
    it = iter(loader)
    batch = next(it)
    t_first = time.perf_counter() - t0
    workers_rss = [rss_mb(p) for p in children(os.getpid())]
    out = {"build_s": t_built, "first_batch_s": t_first, "rank_rss_growth_mb": rss_mb() - rss0,
           "worker_rss_mb": max(workers_rss, default=float("nan")), "batch": batch["batch_size"]}
    del it, loader
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/dinolike_bench_scale")
    p.add_argument("--shards", type=float, nargs="+", default=[1e7, 1e8], help="item counts of the shard index")
    p.add_argument("--folder", type=int, default=100_000, help="tiny files for the folder reader")
    p.add_argument("--manifest", type=int, default=1_000_000, help="lines for the manifest reader")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores (shared with other work); python {sys.version.split()[0]}")
    # a worker's RSS also counts the pages it shares with the rank after fork: its growth is what matters;
    # the baseline is a worker of the smallest data set (fmnist-free: the 10k-item real shard folder)
    rows = []
    base = first_batch(f"shards:{synthetic_shards(work, PER_SHARD)}", PER_SHARD, args.workers)
    rows.append(("shards", PER_SHARD, base))
    for n in [int(x) for x in args.shards]:
        rows.append(("shards", n, first_batch(f"shards:{synthetic_shards(work, n)}", n, args.workers)))
    if args.folder:
        folder = tiny_pngs(work / f"folder_{args.folder}", args.folder)
        rows.append(("folder-nolabels", args.folder, first_batch(f"folder-nolabels:{folder}", args.folder,
                                                                 args.workers)))
    if args.manifest:
        one = next((work / "pngs").rglob("*.png"))
        manifest = work / f"manifest_{args.manifest}.txt"
        if not manifest.exists():
            manifest.write_text(f"{one}\n" * args.manifest)
        rows.append(("manifest", args.manifest, first_batch(f"manifest:{manifest}", args.manifest, args.workers)))
    print(f"{'reader':16} {'items':>12} {'build s':>8} {'1st batch s':>11} {'rank RSS +MB':>12} "
          f"{'worker RSS MB':>13} {'worker +MB':>10} {'build us/item':>13}")
    for name, n, r in rows:
        per_item = 1e6 * r["build_s"] / n  # listing / index cost per item
        print(f"{name:16} {n:>12,} {r['build_s']:>8.2f} {r['first_batch_s']:>11.2f} {r['rank_rss_growth_mb']:>12.1f} "
              f"{r['worker_rss_mb']:>13.1f} {r['worker_rss_mb'] - base['worker_rss_mb']:>10.1f} {per_item:>13.3f}")


if __name__ == "__main__":
    main()
