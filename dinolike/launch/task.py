"""What runs inside each SLURM task: export the torch.distributed environment, run the dinolike
command in-process, and turn its `EXIT_REQUEUE` status into a requeue of the job.

Preemption / timeout protocol (agreed with the training loop):

1. SLURM sends SIGUSR2 `signal_delay_s` before the time limit (``--signal=USR2@N``), or SIGTERM when
   the job is preempted or requeued by an admin.
2. The training loop's own handlers only set a flag; after the iteration in flight it saves a
   checkpoint and the command returns ``EXIT_REQUEUE`` (3).
3. This wrapper then requeues the job (rank 0 runs ``scontrol requeue``; under submitit's local
   executor it exits with submitit's local requeue code) and exits *without* writing a result, so
   submitit's client keeps waiting. The requeued job runs the same command and the loop resumes from
   the newest checkpoint in its output directory.

Why not submitit's own handler: on SIGUSR2 it requeues and `sys.exit`s at once, from inside whatever
the loop is doing, before any checkpoint is written. `SignalGuard` replaces it for the time before
the loop installs its handlers (and hands an early SIGUSR2 over to the loop once it does).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

EXIT_REQUEUE = 3  # == dinolike.training.preempt.EXIT_REQUEUE (kept here so launch imports no torch)
SIGTERM_EXIT = 128 + signal.SIGTERM


def log(msg: str) -> None:
    print(f"[launch] {msg}", file=sys.stderr, flush=True)


class SignalGuard:
    """Own SIGUSR2/SIGTERM while no one else does.

    - SIGTERM before the command installed a handler: exit now (nothing unsaved can be lost yet).
    - SIGUSR2 before that: remember it, and re-send it to the process as soon as another handler
      (the training loop's stop flag) replaces ours, so an early time-limit warning is not lost.
    - After the command returned (`finish()`): ignore both; the job is being wound down.
    """

    def __init__(self) -> None:
        self.received: list[str] = []
        self._finished = False
        self._pending_usr2 = False
        self._watcher: threading.Thread | None = None

    def install(self) -> SignalGuard:
        self._set_handlers()
        return self

    def finish(self) -> None:
        self._finished = True
        self._set_handlers()

    def _set_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread; nothing to guard
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self._finished:
            log(f"ignoring {name}: the command has already returned")
            return
        if signum == signal.SIGTERM:
            log("SIGTERM before the command could checkpoint: exiting")
            raise SystemExit(SIGTERM_EXIT)
        log("SIGUSR2 before the command installed its handler: will forward it")
        self._pending_usr2 = True
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._forward_when_replaced, daemon=True)
            self._watcher.start()

    def _forward_when_replaced(self) -> None:
        while not self._finished:
            current = signal.getsignal(signal.SIGUSR2)
            if self._pending_usr2 and current not in (self._handle, signal.SIG_DFL, signal.SIG_IGN, None):
                self._pending_usr2 = False
                log("forwarding the early SIGUSR2 to the command's handler")
                os.kill(os.getpid(), signal.SIGUSR2)
                return
            time.sleep(0.2)


def resolve_entry(entry: str) -> Callable[[list[str]], int]:
    """`package.module:function` -> the function (the default is dinolike's CLI)."""
    module, _, func = entry.partition(":")
    if not module or not func:
        raise ValueError(f"entry must look like 'package.module:function', got {entry!r}")
    return getattr(importlib.import_module(module), func)


def job_state(job_id: str) -> str:
    """SLURM state of the job (RUNNING, PENDING, CANCELLED, ...) or UNKNOWN if scontrol fails."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    for token in out.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return "UNKNOWN"


def slurm_requeue(job_id: str, max_requeues: int) -> bool:
    """Requeue a *running* job; returns whether it was requeued.

    A job that SLURM already requeued (preemption, `scontrol requeue`) or that was cancelled is not
    RUNNING any more: requeueing it again would resurrect a cancelled job, so it is left alone.
    """
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        log(f"not requeuing job {job_id}: it already restarted {restarts} times (max {max_requeues})")
        return False
    state = job_state(job_id)
    if state != "RUNNING":
        log(f"not requeuing job {job_id}: its state is {state} (SLURM already requeued or ended it)")
        return False
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        log(f"scontrol requeue {job_id} failed: {proc.stderr.strip()}")
        return False
    log(f"requeued job {job_id} (restart {restarts + 1})")
    return True


@dataclass
class LaunchTask:
    """The picklable callable submitit runs once per task (one task per GPU)."""

    command: str
    args: list[str]
    cwd: str
    entry: str = "dinolike.cli:main"
    max_requeues: int = 20
    extra_env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> int:
        guard = SignalGuard().install()
        os.chdir(self.cwd)
        os.environ.update(self.extra_env)
        cluster, rank, job_id = self._export_distributed_env()
        log(f"{cluster} job {job_id} rank {rank}/{os.environ.get('WORLD_SIZE')}: "
            f"dinolike {self.command} {' '.join(self.args)}")  # fmt: skip
        try:
            code = resolve_entry(self.entry)([self.command, *self.args])
        finally:
            guard.finish()
        code = 0 if code is None else int(code)
        if code == 0:
            return 0
        if code == EXIT_REQUEUE:
            self._requeue(cluster, rank, job_id)  # always raises SystemExit
        raise RuntimeError(f"dinolike {self.command} exited with status {code} (see this task's log)")

    def _export_distributed_env(self) -> tuple[str, int, str]:
        """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's view of the job."""
        import submitit

        if not os.environ.get("SUBMITIT_EXECUTOR"):  # called directly (tests, debugging)
            return "none", int(os.environ.get("RANK", "0")), "-"
        env = submitit.JobEnvironment()
        # Keep every GPU visible: the trainer picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return env.cluster, env.global_rank, env.job_id

    def _requeue(self, cluster: str, rank: int, job_id: str) -> None:
        """Exit without a result (submitit keeps waiting) after asking for a requeue."""
        if cluster == "slurm":
            if rank == 0:
                slurm_requeue(job_id, self.max_requeues)
            raise SystemExit(EXIT_REQUEUE)
        if cluster == "local":
            from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

            log("requeue under the local executor")
            raise SystemExit(LOCAL_REQUEUE_RETURN_CODE)
        log("checkpoint saved after a stop request; run the same command again to resume")
        raise SystemExit(EXIT_REQUEUE)
