"""The collapse watch: its signals on real tensors, its rules, and real runs (one made to collapse)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit import REPO, SMOKE

from dinolike.checkpoints import files as ck
from dinolike.config import load_config
from dinolike.training.collapse import CollapseError, CollapseWatch
from dinolike.training.loop import train
from dinolike.training.ssl import collapse_signals

K = 256
LN_K = math.log(K)


def test_signals_read_uniform_targets_and_one_prototype_predictions() -> None:
    uniform = torch.full((8, K), 1.0 / K)
    one_hot_logits = torch.full((8, K), -10.0)
    one_hot_logits[:, 3] = 10.0  # every image on prototype 3
    s = collapse_signals(one_hot_logits, uniform, student_temp=0.1)
    assert s["teacher_entropy"].item() == pytest.approx(LN_K, abs=1e-4)
    assert s["student_mean_entropy"].item() < 1e-3
    # diverse predictions: image i on prototype i -> the batch mean spreads over 8 prototypes
    diverse = torch.full((8, K), -10.0)
    diverse[torch.arange(8), torch.arange(8)] = 10.0
    sharp = torch.softmax(diverse / 0.1, dim=-1)
    s = collapse_signals(diverse, sharp, student_temp=0.1)
    assert s["student_mean_entropy"].item() == pytest.approx(math.log(8), abs=1e-3)
    assert s["teacher_entropy"].item() < 1e-3


def healthy(loss: float = 5.1) -> dict:
    return {"dino_global_loss": loss, "teacher_entropy": 4.6, "student_mean_entropy": 5.5, "koleo_loss": 0.3}


def uniform() -> dict:
    return {"dino_global_loss": 5.54, "teacher_entropy": 5.52, "student_mean_entropy": 5.54, "koleo_loss": 1.3}


def test_watch_stops_only_on_a_sustained_symptom_after_the_start() -> None:
    w = CollapseWatch(n_prototypes=K, start_iters=100, patience_iters=100)
    for it in range(10, 100, 10):
        w.update(it, uniform())  # before start_iters: the loss starts at ln K anyway
    assert not w.suspect
    w.update(100, healthy())
    w.update(110, uniform())
    assert w.suspect and w.onset == 110
    w.update(150, uniform())
    w.update(160, healthy())  # a blip shorter than the patience is forgiven
    assert not w.suspect
    for it in range(170, 270, 10):
        w.update(it, uniform())
    with pytest.raises(CollapseError) as e:
        w.update(270, uniform(), last_checkpoint="ckpt_0000100.pt")
    msg = str(e.value)
    assert "iteration 170" in msg and "to iteration 270" in msg and "uniform outputs" in msg
    assert "ckpt_0000100.pt" in msg and "optim.base_lr" in msg and "KoLeo 1.300" in msg


def test_watch_one_prototype_symptom_and_off_switch() -> None:
    row = {**healthy(), "student_mean_entropy": 0.4}
    w = CollapseWatch(n_prototypes=K, patience_iters=0)
    with pytest.raises(CollapseError, match="one-prototype outputs"):
        w.update(5, row)
    off = CollapseWatch(n_prototypes=K, enabled=False, patience_iters=0)
    off.update(5, row)
    assert not off.suspect


def test_watch_config_defaults_to_the_end_of_the_warmup_and_checks_values() -> None:
    cfg = load_config(SMOKE, [])
    w = CollapseWatch.from_config(cfg)
    assert w.start_iters == int(cfg.optim.warmup_epochs * cfg.optim.epoch_length) and w.enabled
    assert w.n_prototypes == cfg.heads.out_dim
    with pytest.raises(ValueError, match="collapse.patience_iters"):
        CollapseWatch.from_config(load_config(SMOKE, ["collapse.patience_iters=-1"]))


def test_smoke_run_is_not_flagged_and_logs_the_watched_values(tmp_path: Path) -> None:
    # judged from the first logged row, with a short patience: a false alarm would stop it
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "collapse.start_iters=0", "collapse.patience_iters=5"])
    assert train(cfg) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert 0 < r["teacher_entropy"] < 0.95 * LN_K  # Sinkhorn-Knopp at 0.04 keeps targets sharp
        assert r["student_mean_entropy"] > 0.9 * LN_K  # predictions spread over the prototypes
    assert (tmp_path / "teacher_backbone.pth").is_file()


def test_a_run_made_to_collapse_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tmp_path: Path) -> None:
    # a teacher temperature of 1000 makes every target uniform: the student can only learn ln K
    cmd = [sys.executable, "-m", "dinolike.cli", "train", "--config", str(SMOKE), f"run.output_dir={tmp_path}",
           "optim.epochs=6", "teacher.warmup_temp=1000", "teacher.temp=1000", "collapse.start_iters=15",
           "collapse.patience_iters=20"]
    p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("dinolike train: error: training collapsed at iteration 15 and stayed collapsed to "
                          "iteration 35: uniform outputs"), err
    assert "Traceback" not in p.stderr
    # the periodic checkpoints of iterations 20 and 30 were held back: the newest is from before the onset
    assert [c.name for c in ck.list_checkpoints(tmp_path / "checkpoints")] == ["ckpt_0000010.pt"]
    assert "ckpt_0000010.pt, is from before the onset" in err
    assert not (tmp_path / "teacher_backbone.pth").exists()  # nothing is exported from a collapsed run
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 35
    assert rows[-1]["teacher_entropy"] == pytest.approx(LN_K, abs=1e-3)
    assert rows[-1]["dino_global_loss"] > 0.97 * LN_K


def replay(name: str, watch: CollapseWatch) -> None:
    for line in (REPO / "tests" / "data" / name).read_text().splitlines():
        row = json.loads(line)
        watch.update(row["iteration"], row)


def test_watch_on_rows_logged_by_real_runs_fires_on_the_real_collapse_only() -> None:
    # rows of two real 1-epoch runs of configs/fmnist_cpu.yaml (seed 1, one process, torch 2.14; BENCHMARKS
    # section 1b): with the old 94-iteration lr warmup it collapsed (loss back at ln K from iteration ~300),
    # with the 469-iteration warmup it learned. Both are judged from the end of the old warmup on.
    w = CollapseWatch(n_prototypes=K, start_iters=94, patience_iters=200)
    with pytest.raises(CollapseError, match=r"collapsed at iteration 350 and stayed collapsed to iteration 550"):
        replay("metrics_collapsed_warmup01_seed1.jsonl", w)
    w = CollapseWatch(n_prototypes=K, start_iters=94, patience_iters=200)
    replay("metrics_healthy_warmup05_seed1.jsonl", w)
    assert not w.suspect
