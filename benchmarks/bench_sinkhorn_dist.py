"""Sinkhorn-Knopp across 2 CPU ranks: the gathered batch against the log-domain iterations.

The main job's two processes call Sinkhorn-Knopp twice a step (DINO: [64, 256] on each rank, the 2 global
crops of its 32 images; iBOT: its masked patches, ~150 x 256). Across ranks, the log-domain iterations
need 7 collectives a call, the gathered path 2 (row counts, rows); each collective is a point where the
ranks wait for each other.
Prints ms per step (both calls) for each path, and the cost of one small collective, on 2 gloo ranks of
1 thread each:

    python benchmarks/bench_sinkhorn_dist.py [--steps 300]
"""

from __future__ import annotations

import argparse
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinolike.loss.centering import sinkhorn_knopp

PATHS = {"log domain across ranks": {"gather_max_bytes": 0}, "gathered batch": {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(steps: int, fn) -> float:
    """ms per call of `fn`, between two barriers (both ranks start and stop together)."""
    for _ in range(20):
        fn()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    dist.barrier()
    return (time.perf_counter() - t) / steps * 1000


def _worker(rank: int, port: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(rank)
    dino = torch.randn(64, 256, generator=gen) * 0.5  # [2B, K] this rank's global crops, B = 32
    ibot = torch.randn(150 + 10 * rank, 256, generator=gen) * 0.5  # [M, K] masked patches, unequal per rank
    results = {}
    for _ in range(2):  # twice, alternating: the machine's speed drifts
        for name, kwargs in PATHS.items():
            ms = _timed(steps, lambda kw=kwargs: (sinkhorn_knopp(dino, 0.04, **kw), sinkhorn_knopp(ibot, 0.04, **kw)))
            results.setdefault(name, []).append(ms)
    flags = torch.zeros(9)
    results["one all_reduce of 9 floats"] = [_timed(steps, lambda: dist.all_reduce(flags))]
    if rank == 0:
        for name, values in results.items():
            print(f"{name}: {' / '.join(f'{v:.2f}' for v in values)} ms")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    mp.spawn(_worker, args=(_free_port(), args.steps), nprocs=2, join=True)


if __name__ == "__main__":
    main()
