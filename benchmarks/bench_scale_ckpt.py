"""Checkpoints of an FSDP2 run: host memory at save and bytes read at resume, single file vs sharded DCP.

  nice -n 19 python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_scale_ckpt.py
  ... benchmarks/bench_scale_ckpt.py --arch vit_small      # quicker

Each of the 2 CPU processes builds the pretraining method of configs/base.yaml (student + EMA teacher +
DINO/iBOT heads, default sizes) with the chosen backbone, shards it with FSDP2 and initialises AdamW's
moments, then, per format:
- save: the single file is what the loop wrote before DCP (full tensors gathered to rank 0 in CPU
  memory, torch.save + read-back check there); DCP is `dcp.save_sharded` (each rank writes its shards).
  Reported: the peak RSS above the pre-save level of each rank (sampled every 5 ms) and the wall time;
- resume: `checkpoint.newest_intact` (the integrity check) + the loop's `_restore`, with the bytes each
  rank read through read() (/proc/self/io rchar: page-cache hits count, as on a network filesystem).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from dinolike import dist, fsdp
from dinolike.checkpoints import dcp
from dinolike.checkpoints import files as ck
from dinolike.config import load_config
from dinolike.training.loop import _restore, build_method
from dinolike.training.optim import build_optimizer

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


class PeakRSS:
    """Peak RSS (MB) above the level at entry, sampled in a thread."""

    def __enter__(self) -> PeakRSS:
        self.base, self.peak, self._stop = rss_mb(), rss_mb(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop = True
        self._t.join()
        self.growth = self.peak - self.base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp folder on /tmp)")
    args = p.parse_args()
    cfg = load_config(REPO / "configs" / "base.yaml", [
        f"model.arch={args.arch}", "run.device=cpu", "dist.strategy=fsdp", "model.drop_path_rate=0"])
    env = dist.init_distributed("cpu")
    method = build_method(cfg)
    method.prepare_distributed(env)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, False)
    dcp.sharded_state(method, opt)  # initialises AdamW's moments (what a real checkpoint holds)
    n_params = sum(p.numel() for p in method.parameters())
    root = Path(dist.all_gather_objects(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))[0])
    meta = {"iteration": 1, "config": ck.config_json({}), "rng": ck.rng_state(),
            "rng_ranks": dist.all_gather_objects(ck.rng_state())}
    res: dict[str, dict[str, float]] = {}

    single = root / "single"
    dist.barrier()
    with PeakRSS() as save1:
        state = {"model": {k: fsdp.model_state(v) for k, v in method.checkpointed_parts().items()},
                 "optimizer": fsdp.optim_state(method.student, opt), **meta}
        if env.is_main:
            ck.save_checkpoint(single, 1, state, keep_last=3)
        del state
        dist.barrier()
    sharded = root / "dcp"
    with PeakRSS() as save2:
        dcp.save_sharded(ck.checkpoint_path(sharded, 1, sharded=True), method, opt, meta)
    for name, folder, save in (("single file", single, save1), ("DCP", sharded, save2)):
        dist.barrier()
        r0 = rchar()
        with PeakRSS() as load:
            path, ckpt = ck.newest_intact(folder, main=env.is_main)
            _restore(method, opt, ckpt, path)
            del ckpt
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        res[name] = {"save_peak_mb": save.growth, "save_s": save.seconds, "read_mb": (rchar() - r0) / 2**20,
                     "load_peak_mb": load.growth, "load_s": load.seconds, "size_mb": size / 2**20}
    rows = dist.all_gather_objects(res)
    if env.is_main:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                   platform.processor())
        print(f"CPU: {cpu}, {os.cpu_count()} cores (shared with other work); {args.arch}: {n_params / 1e6:.1f} M "
              f"parameters per rank's view (student + teacher + heads), 2 processes, torch {torch.__version__}")
        print(f"{'format':12} {'rank':>4} {'ckpt MB':>8} {'save s':>7} {'save peak +MB':>13} {'resume s':>8} "
              f"{'resume read MB':>14} {'resume peak +MB':>15}")
        for name in res:
            for rank, r in enumerate(rows):
                x = r[name]
                print(f"{name:12} {rank:>4} {x['size_mb']:>8.0f} {x['save_s']:>7.1f} {x['save_peak_mb']:>13.0f} "
                      f"{x['load_s']:>8.1f} {x['read_mb']:>14.0f} {x['load_peak_mb']:>15.0f}")
    dist.barrier()
    if env.is_main and args.dir is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
