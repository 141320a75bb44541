"""One output folder, one run: `OUT/.lock`, held by the run's supervising process for its whole life.

Two runs started into one folder a second apart were both accepted as a new run: their metrics rows
interleaved, log.txt held two summaries and their checkpoints overwrote each other. The lock is an
exclusive `flock` on `OUT/.lock`, which the kernel drops when its process dies however it dies, so a killed
run never leaves the folder stuck; the file names its holder, so the refusal says who holds it, and a
name left in it by a dead run is taken over with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from dinolike.config import ConfigError

log = logging.getLogger("dinolike.train")
LOCK_NAME = ".lock"


def lock_holder() -> bool:
    """Whether this process takes the lock: not a `dist.local_processes` child (its parent holds it), and
    rank 0 of a job torchrun or SLURM started (one lock per job, not per process)."""
    from dinolike.local_procs import CHILD_ENV

    if os.environ.get(CHILD_ENV) == "1":
        return False
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


class RunLock:
    """`with RunLock(out):` holds `out/.lock` or raises ConfigError in one line naming the holder."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process of another host"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a file system without locks
                log.warning("cannot lock run.output_dir %s (%s): a second run into it would not be refused",
                            self.path.parent, e.strerror)
                return self
            raise ConfigError(f"run.output_dir {self.path.parent} is in use by another run ({holder}): wait for "
                              "it to end or stop it, or give another run.output_dir") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:  # released locks are emptied: a name left here is a run that was killed
            self._warn_stale(previous)
        me = f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        return self

    def _warn_stale(self, previous: str) -> None:
        text = (f"run.output_dir {self.path.parent}: taking over the lock of a run that ended without releasing "
                f"it ({previous}; killed?); its newest checkpoint is resumed from as usual")
        log.warning(text)
        try:  # log.txt is not open yet: the run's history keeps it anyway
            with open(self.path.parent / "log.txt", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {text}\n")
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # emptied, not deleted: deleting would let a third run lock a new file
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
