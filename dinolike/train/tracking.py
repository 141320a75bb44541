"""Experiment tracking beside metrics.jsonl: TensorBoard event files, optional wandb, and `log.txt`.

The loop hands every metrics row to `Tracker.log`; TensorBoard and wandb get the same numbers as
metrics.jsonl (losses, lr, periodic kNN, ...). `log.txt` in the run folder keeps everything the run printed
(log records, warnings about skipped images, messages on stderr), so a finished run explains itself
without the terminal it ran in. Only rank 0 tracks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("dinolike.train")


class _Tee:
    """A stream that also appends to log.txt; progress-bar redraws (carriage returns) stay off the file."""

    def __init__(self, stream: TextIO, file: TextIO) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.file.write(text)
            self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno: the real stream's
        return getattr(self.stream, name)


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
    """Owns log.txt, the TensorBoard writer and the wandb run of one training run (rank 0 only)."""

    def __init__(self, cfg: Any, out: Path, is_main: bool) -> None:
        self.tb = self.wandb = self._file = None
        self._streams: tuple[TextIO, TextIO] | None = None
        self._handler: logging.Handler | None = None
        self.last_knn: float | None = None
        if not is_main:
            return
        self._file = open(out / "log.txt", "a")  # noqa: SIM115 - closed in close()
        self._handler = logging.FileHandler(out / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
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
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        if self._file is not None:
            self._file.close()
        self.tb = self.wandb = self._file = self._handler = self._streams = None


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
