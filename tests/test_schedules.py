"""The lr schedule shapes of `optim.lr_schedule`: the cosine (the default) and constant after the warmup,
with an optional linear cooldown at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinolike.config import ConfigError, load_config
from dinolike.training.schedules import build_schedules
from dinolike.training.validate import check_train_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fmnist_cpu.yaml"


def _lr(*overrides: str) -> np.ndarray:
    cfg = load_config(CONFIG, ["optim.epochs=2", *overrides])  # 1874 iterations, warmup 468
    check_train_config(cfg)
    return build_schedules(cfg, 64).lr


def test_constant_lr_holds_the_peak_after_the_warmup() -> None:
    lr = _lr("optim.lr_schedule=constant")
    cosine = _lr()
    assert len(lr) == len(cosine) == 1874
    np.testing.assert_allclose(lr[:468], cosine[:468])  # the same warmup from 0
    assert lr[0] == 0.0 and lr[467] < 0.004
    np.testing.assert_array_equal(lr[468:], 0.004)  # the peak (lr_scaling: none), to the last iteration
    assert cosine[-1] < 1e-5 and cosine[1171] == pytest.approx(0.002, rel=1e-2)  # the cosine's half-way


def test_constant_lr_with_a_cooldown_ends_at_min_lr() -> None:
    lr = _lr("optim.lr_schedule=constant", "optim.lr_cooldown_epochs=0.5")  # the last 468 iterations
    np.testing.assert_array_equal(lr[468:1406], 0.004)
    tail = lr[1406:]
    assert len(tail) == 468 and tail[0] == 0.004 and tail[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(tail) < 0)  # linear, falling every iteration
    np.testing.assert_allclose(np.diff(tail), np.diff(tail)[0])


def test_cooldown_longer_than_the_run_is_clipped() -> None:
    lr = _lr("optim.lr_schedule=constant", "optim.lr_cooldown_epochs=10")
    assert len(lr) == 1874 and lr[468] == 0.004 and lr[-1] == pytest.approx(1e-6)


def test_unknown_lr_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match="optim.lr_schedule must be one of"):
        _lr("optim.lr_schedule=linear")
