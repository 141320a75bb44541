"""Processes known by pid: is it alive, is it the daemon we started, stop it. The test cluster stops
exactly what it started this way (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def pid_alive(pid: int, child: subprocess.Popen | None) -> bool:
    """True while the process runs; a zombie counts as gone (it is reaped if it is our child)."""
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pid_is(pid: int, name: str) -> bool:
    """Guard against pid reuse: only signal a pid whose command line is the daemon we started."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return Path(argv0).name == name


def terminate(pid: int, child: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds: a daemon gets its chance to shut down cleanly."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, child):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid, child):
        time.sleep(0.1)
