"""A seconds-long stand-in for `dinolike train` that follows the same preemption protocol.

Why: the launcher tests must exercise SLURM (tasks, signals, requeue, resume) in a few seconds and
independently of the model code. Like the real loop it: initialises torch.distributed from the
RANK/WORLD_SIZE/MASTER_* variables the launcher exports, installs SIGUSR2/SIGTERM handlers that only
set a flag, agrees on stopping across ranks, checkpoints to its output dir, resumes from it, and
returns EXIT_REQUEUE (3) after saving on a stop request.

Call: entry ``tests.slurm.standin_train:main`` with argv
``[command, --out DIR, --iters N, --ckpt-every K, --step-s SECONDS]``.
Writes ``DIR/ckpt.json`` (iteration, history of every completed iteration with the SLURM restart
count it ran under) and ``DIR/done.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

EXIT_REQUEUE = 3


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # atomic: a kill mid-save never leaves half a checkpoint


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"standin {argv[0] if argv else ''}")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--step-s", type=float, default=0.2)
    args = p.parse_args(argv[1:])

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = {"signal": None}

    def handle(signum: int, frame: object) -> None:
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handle) for s in (signal.SIGUSR2, signal.SIGTERM)}
    ckpt = args.out / "ckpt.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"iteration": 0, "history": []}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"standin: rank {rank}/{world} starts at iteration {state['iteration']}", flush=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    try:
        for it in range(state["iteration"], args.iters):
            time.sleep(args.step_s)
            # A real collective each step: proves the exported env wires all ranks together.
            ranks_sum = torch.tensor([float(rank + 1)])
            flag = torch.tensor([1.0 if stop["signal"] else 0.0])
            if world > 1:
                dist.all_reduce(ranks_sum)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            state["iteration"] = it + 1
            state["history"].append(
                {"iteration": it + 1, "restart": restart, "world": world, "ranks_sum": ranks_sum.item()}
            )
            stopping = flag.item() > 0
            if (it + 1) % args.ckpt_every == 0 or stopping or it + 1 == args.iters:
                if rank == 0:
                    _save(ckpt, state)
                if world > 1:
                    dist.barrier()
            if stopping:
                if rank == 0:
                    print(f"standin: stop request ({stop['signal']}) saved at {it + 1}", flush=True)
                return EXIT_REQUEUE
        if rank == 0:
            _save(args.out / "done.json", {"iteration": state["iteration"], "restart": restart})
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
