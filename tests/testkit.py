"""Helpers several test files share (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "fmnist_smoke.yaml"


def rows(out: Path) -> list[dict]:
    """The metrics.jsonl rows of a run directory."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    """A TCP port nobody listens on now (for a test's own process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (what the embedders hand to faiss)."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def unreadable_folder(root: Path, n: int = 3) -> Path:
    """A folder of `n` files named .png that are no images: a dataset with nothing readable."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i}.png").write_bytes(b"not a png")
    return root


class FirstStep(Exception):
    """Raised instead of the first training step by `no_training_step`."""


def no_training_step(monkeypatch) -> type[FirstStep]:
    """Make `dinolike.training.loop` raise FirstStep at its first step: the start-up, summary and warnings
    of a run without its training."""
    from dinolike.training import loop

    def no_step(*args, **kwargs):
        raise FirstStep

    monkeypatch.setattr(loop, "train_step", no_step)
    return FirstStep
