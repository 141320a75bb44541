"""`dinolike train` with one injected fault: the fault-injection suite's stand-in for a machine that dies.

    python tests/fault_driver.py [--kill PHASE@ITERATION] [--nan RANK@ITERATION] -- TRAIN ARGS

The process SIGKILLs itself (what `kill -9` or the OOM killer does: no handler, no cleanup) at PHASE of
step ITERATION (0-based: the step that completes iteration ITERATION + 1):
  forward        before the forward pass
  step           after the optimizer step, before the teacher's EMA update
  write-mid      half of checkpoint ITERATION written to its temp file (fsynced)
  before-rename  the temp file complete and fsynced, not yet renamed
  after-rename   renamed into place, older checkpoints not yet pruned
  dcp-mid        a sharded (DCP) checkpoint ITERATION: every rank's shards written, the manifest not yet
                 (rank 0 dies; torchrun then stops the others)
(for the three write phases ITERATION is the checkpoint's iteration number, ckpt_ITERATION.pt).
The hooks sit on the method interface and on torch.save / os.replace, so they follow the loop wherever
its code moves.
--nan RANK@ITERATION: on process RANK only (the RANK variable torchrun sets; 0 without it), the KoLeo term
is NaN from step ITERATION (0-based) on, as when one replica's batch holds a bad image: the other ranks must
see it and stop at the same step instead of waiting for it in a collective.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
from pathlib import Path

import torch

PHASES = ("forward", "step", "write-mid", "before-rename", "after-rename", "dcp-mid")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(phase: str, at: int, batch_size: int) -> None:
    from dinolike.training.ssl import SSLMethod

    current = {"it": -1}
    real_forward, real_after = SSLMethod.forward_loss, SSLMethod.after_step
    real_save, real_replace = torch.save, os.replace
    target = f"ckpt_{at:07d}.pt"

    def forward_loss(self, batch, sched, *step_phase):
        current["it"] = int(batch["positions"][0]) // batch_size  # one process: position = it * B + j
        if phase == "forward" and current["it"] == at:
            die()
        return real_forward(self, batch, sched, *step_phase)

    def after_step(self, sched):
        if phase == "step" and current["it"] == at:
            die()
        return real_after(self, sched)

    def save(obj, f, *args, **kwargs):
        if phase == "write-mid" and Path(getattr(f, "name", "")).name.startswith(f".{target}.tmp"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst):
        hit = Path(dst).name == target
        if hit and phase == "before-rename":
            die()
        real_replace(src, dst)
        if hit and phase == "after-rename":
            die()

    SSLMethod.forward_loss, SSLMethod.after_step = forward_loss, after_step
    torch.save, os.replace = save, replace
    if phase == "dcp-mid":
        import dinolike.checkpoints.dcp as dcp

        real_manifest = dcp._write_manifest

        def write_manifest(folder: Path, manifest: dict) -> None:
            if manifest["iteration"] == at:
                die()
            real_manifest(folder, manifest)

        dcp._write_manifest = write_manifest


def install_nan(rank: int, at: int) -> None:
    import dinolike.training.ssl as ssl

    if int(os.environ.get("RANK", "0")) != rank:
        return
    real = ssl.koleo_loss
    calls = {"n": 0}

    def koleo_loss(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # one call per global crop: 2 a step
        out = real(x)
        return out * float("nan") if calls["n"] > 2 * at else out

    ssl.koleo_loss = koleo_loss


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kill", default=None, help="PHASE@ITERATION")
    p.add_argument("--nan", default=None, help="RANK@ITERATION")
    if "--" in argv:
        args, train_args = p.parse_args(argv[: argv.index("--")]), argv[argv.index("--") + 1 :]
    else:  # torchrun drops the "--": the driver's own options first, the rest is for `train`
        args, train_args = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dinolike.commands import train as cli

    if args.kill:
        phase, at = args.kill.split("@")
        assert phase in PHASES, phase
        cfg = cli.validate(["train", *train_args])
        install(phase, int(at), cfg.data.batch_size)
    if args.nan:
        rank, at = args.nan.split("@")
        install_nan(int(rank), int(at))
    return cli.main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
