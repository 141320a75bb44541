"""What a run tells the world beside metrics.jsonl: `log.txt` and the terminal, TensorBoard, optional wandb.

`RunLog` keeps log.txt from the run's first line to its last: the start summary, every metrics row in
words, warnings (resume, skipped images, collapse), the end or the error. The loop hands every metrics
row to `Tracker.log` too; TensorBoard and wandb get the same numbers as metrics.jsonl. Only rank 0 writes.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("dinolike.train")


class LogFile:
    """log.txt, appended to; a write that fails (a full disk) turns it off with one warning on the terminal
    instead of raising from inside a print or a log record, where it would bury the real error."""

    def __init__(self, path: Path, terminal: TextIO) -> None:
        self.path, self.terminal = path, terminal
        self._file: TextIO | None = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, text: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as e:
            self.close()
            self.terminal.write(f"warning: cannot write {self.path} ({e.strerror or e}); the run goes on, "
                                "logging to the terminal only\n")

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


class _Tee:
    """A stream that also appends to log.txt; progress-bar redraws (carriage returns) stay off the file."""

    def __init__(self, stream: TextIO, file: LogFile) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno: the real stream's
        return getattr(self.stream, name)


class _FileHandler(logging.Handler):
    """Log records into log.txt through the guarded LogFile (logging's own FileHandler prints a traceback
    on every record it cannot write)."""

    def __init__(self, file: LogFile) -> None:
        super().__init__()
        self.file = file
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.file.write(self.format(record) + "\n")


def _logs_to_terminal(logger: logging.Logger) -> bool:
    """Whether a handler of `logger` already writes to the terminal (the command's logging.basicConfig)."""
    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    return any(isinstance(h, logging.StreamHandler) and h.stream in terminal for h in logger.handlers)


class RunLog:
    """log.txt of a run from its first line to its last (rank 0 only; a no-op elsewhere): everything
    printed and logged while it is open, and the error a run ends with, so a finished or failed run explains
    itself without the terminal it ran in. Opened before anything can fail (resume warnings included)."""

    def __init__(self, out: Path, is_main: bool) -> None:
        self.out, self.is_main = out, is_main
        self.file: LogFile | None = None
        self._streams: tuple[TextIO, TextIO] | None = None
        self._handler: logging.Handler | None = None
        self._terminal: logging.Handler | None = None

    def __enter__(self) -> RunLog:
        if self.is_main:
            self.file = LogFile(self.out / "log.txt", sys.stderr)
            self._handler = _FileHandler(self.file)
            root = logging.getLogger()
            if not _logs_to_terminal(root):  # a Python caller (dinolike.train) set up no logging: without
                # this its warnings (constant embeddings, skipped images) reached log.txt only
                self._terminal = logging.StreamHandler(sys.stderr)  # the real stderr, before the tee
                self._terminal.setLevel(logging.WARNING)
                self._terminal.setFormatter(logging.Formatter("%(name)s: warning: %(message)s"))
                root.addHandler(self._terminal)
            root.addHandler(self._handler)
            self._streams = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if self.file is not None and error is not None:
            # the file only: the command prints its own one-line error to the terminal
            what = ("interrupted (Ctrl-C)" if kind is KeyboardInterrupt else
                    f"stopped by {error} outside the training loop" if kind.__name__ == "StopSignal" else
                    f"{kind.__name__}: {error}")
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} error: {what}\n")
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
        for handler in (self._handler, self._terminal):
            if handler is not None:
                logging.getLogger().removeHandler(handler)
        self._terminal = None
        if self.file is not None:
            self.file.close()
        self.file = self._streams = self._handler = None

    def say(self, text: str, bar: Any = None) -> None:
        """One line of the run's report to stdout and log.txt, above the progress bar when there is one.
        stdout, not stderr: warnings and the one-line errors stay alone on stderr, and `> report.txt`
        keeps the report."""
        if not self.is_main:
            return
        if bar is not None:
            bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)


def tensorboard_writer(setting: bool | None, out: Path) -> Any:
    """A SummaryWriter writing into `out`, or None. `setting` None: on when the package is installed;
    True: required (a clear error when it is missing); False: off."""
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if setting:
            raise ValueError(
                "run.tensorboard=true but the tensorboard package is not installed: `pip install tensorboard`, "
                "or set run.tensorboard=false"
            ) from e
        return None
    return SummaryWriter(log_dir=str(out))


class Tracker:
    """Owns the TensorBoard writer and the wandb run of one training run (rank 0 only)."""

    def __init__(self, cfg: Any, out: Path, is_main: bool) -> None:
        self.tb = self.wandb = None
        self.last_knn: float | None = None
        if not is_main:
            return
        self.tb = tensorboard_writer(cfg.run.tensorboard, out)
        if cfg.run.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(f"run.wandb={cfg.run.wandb} but wandb is not installed: `pip install wandb`") from e
            from omegaconf import OmegaConf

            self.wandb = wandb.init(project=str(cfg.run.wandb), name=out.name, dir=str(out),
                                    config=OmegaConf.to_container(cfg, resolve=True), resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (numbers by name, with `iteration`) to every tracker."""
        it = int(row["iteration"])
        numbers = {k: float(v) for k, v in row.items()
                   if k != "iteration" and isinstance(v, int | float) and not isinstance(v, bool)}
        if "knn_top1" in numbers:
            self.last_knn = numbers["knn_top1"]
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, it)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=it)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None


def print_outputs(out: Path) -> None:
    """Where a finished run's outputs are, so the next step (eval, export, TensorBoard) is one copy away."""
    items = [("run folder", out), ("merged config", out / "config.yaml"), ("metrics", out / "metrics.jsonl"),
             ("log", out / "log.txt"), ("checkpoints", out / "checkpoints"),
             ("backbone (official keys)", out / "teacher_backbone.pth")]
    lines = [f"  {name:<25} {path}" for name, path in items if path.exists()]
    if any(out.glob("events.out.tfevents.*")):
        lines.append(f"  {'TensorBoard':<25} tensorboard --logdir {out}")
    lines.append(f"  {'export':<25} dinolike export {out} --format hf|timm|official --out DIR")
    print("outputs:\n" + "\n".join(lines), file=sys.stderr)
