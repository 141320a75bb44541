"""Run one training job as N processes on this machine (`dist.local_processes`), without torchrun.

Why: a tiny ViT on a CPU scales badly over threads (its matmuls are too small for two OpenMP threads to
share), but two processes of one thread each, averaging gradients over gloo, keep both cores busy: on
the 2-core development box the default recipe runs ~1.2x faster that way (BENCHMARKS.md, section 1).

The parent only supervises: it starts the children with the torchrun variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) and an equal share of the cores as OMP_NUM_THREADS, in their own session so
that Ctrl-C reaches only the parent, which turns it (and SIGTERM) into SIGTERM for the children and
forwards SIGUSR2: the job checkpoints and exits 3 as a single process would; a second Ctrl-C reaches the
children as SIGINT, which aborts them at once. If one child fails, the
parent stops the others instead of leaving them blocked in a collective; if the parent dies, Linux
sends the children SIGTERM. The exit status is the first failing child's, else theirs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

_GRACE_S = 30.0  # after one child fails: time the others get to exit on SIGTERM before SIGKILL
CHILD_ENV = "DINOLIKE_LOCAL_CHILD"  # set to "1" in the children: they leave job-level work to the parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_process(n: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // n)


def child_env(rank: int, n: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
               **{CHILD_ENV: "1"})
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):  # not Linux: the parent's own handlers still forward signals
        pass


def run_local(argv: list[str], n: int, program: list[str] | None = None) -> int:
    """Start `python -m dinolike.cli ARGV` (or PROGRAM ARGV) n times as one process group; wait; return
    the exit status (0 when all succeed, else the first non-zero one; 3 = stopped with a checkpoint)."""
    port, threads = free_port(), threads_per_process(n)
    cmd = [*(program or [sys.executable, "-m", "dinolike.cli"]), *argv]
    procs = [subprocess.Popen(cmd, env=child_env(r, n, port, threads), start_new_session=True,
                              preexec_fn=_die_with_parent) for r in range(n)]

    interrupts = 0
    stopped: list[str] = []  # the stop signal this parent forwarded, if any

    def forward(signum: int, frame: object) -> None:
        nonlocal interrupts
        stopped.append(signal.Signals(signum).name)
        sent = signal.SIGUSR2 if signum == signal.SIGUSR2 else signal.SIGTERM
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts == 1:
                os.write(2, b"\nCtrl-C: stopping after this iteration with a checkpoint and the teacher export "
                            b"(Ctrl-C again to abort at once)\n")
            else:
                sent = signal.SIGINT  # a second Ctrl-C: the children, already stopping, abort now
        for p in procs:
            if p.poll() is None:
                p.send_signal(sent)

    watched = [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT]
    previous = {s: signal.signal(s, forward) for s in watched}
    status, failed_at = 0, None
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, 0) for c in codes):
                status = next(c for c in codes if c not in (None, 0))
                failed_at = time.monotonic()  # one child failed: the others would wait in a collective
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    for p in procs:
        if p.returncode != 0 and status == 0:
            status = p.returncode
    if stopped and status in (-signal.SIGTERM, -signal.SIGUSR2):
        # a child still starting (before Python could catch the signal) died of the stop it was sent:
        # that is a stop, not a failure, and it must be said (it used to be exit 1 and no word)
        os.write(2, f"\nstopped by {stopped[0]} while the {n} processes were starting; the newest checkpoint "
                    "(if any) is intact: run the same command to start or resume\n".encode())
        return 3
    return status if status >= 0 else 1  # a child killed by a signal has a negative returncode
