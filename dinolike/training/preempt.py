"""Stop requests: Ctrl-C (SIGINT), SLURM (SIGUSR2 before the time limit, SIGTERM on preemption) or a time budget.

The handler only sets a flag; the loop finishes the iteration in flight, saves a checkpoint, exports the
teacher and returns EXIT_REQUEUE, so no state is ever saved from the middle of a step. Ctrl-C is the stop
every one-process user reaches for, so it stops the same way (it used to kill the run with a traceback and
lose up to `run.checkpoint_every - 1` iterations); a second Ctrl-C aborts at once (KeyboardInterrupt), for
when the user cannot wait for the iteration in flight.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

EXIT_REQUEUE = 3  # `dinolike train` exit status: checkpoint saved after a stop request, requeue me


class StopFlag:
    def __init__(self, time_limit_min: float | None = None) -> None:
        self.requested: str | None = None
        self._deadline = time.monotonic() + 60 * time_limit_min if time_limit_min else None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> StopFlag:
        self._pid = os.getpid()  # data-loader workers forked later inherit the handler: they must ignore it
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread): no signals
                pass
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a loader worker (Ctrl-C reaches the whole process group): the main
            return                    # process stops the run and then its workers
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second stop request by Ctrl-C: abort now
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:  # os.write: print() is not safe inside a signal handler
            os.write(2, b"\nCtrl-C: stopping after this iteration with a checkpoint and the teacher export "
                        b"(Ctrl-C again to abort at once)\n")

    def should_stop(self) -> str | None:
        if self.requested is None and self._deadline is not None and time.monotonic() > self._deadline:
            self.requested = "time_limit"
        return self.requested


class StopSignal(BaseException):
    """SIGTERM or SIGUSR2 before the loop's StopFlag listens (start-up: imports, model, data) or after it
    (the export, the final kNN). A BaseException like KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _raise_stop(signum: int, frame: object) -> None:
    raise StopSignal(signal.Signals(signum).name)


@contextlib.contextmanager
def startup_signals() -> Iterator[None]:
    """Around `dinolike train` from its first line: SIGTERM (a scheduler, `kill`, the parent of local
    processes) and SIGUSR2 used to kill the start-up silently (status -15, nothing printed); inside, they
    raise StopSignal, which the command turns into one line and exit status 3, as a stop in the loop gives
    (the loop's StopFlag takes over while it runs). Ctrl-C (SIGINT) keeps Python's KeyboardInterrupt, which
    the command catches from its first line too. The previous handlers come back on the way out (a
    pipeline calls the command in its own process)."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        try:
            previous[sig] = signal.signal(sig, _raise_stop)
        except ValueError:  # not the main thread (an API call from a thread): signals stay as they are
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
