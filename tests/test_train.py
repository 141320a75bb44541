"""End to end: the training loop on real Fashion-MNIST images, resume (exact), NaN guard, bad images."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import REPO, SMOKE, rows

from dinolike.checkpoints import files as ck
from dinolike.config import load_config
from dinolike.data.datasets import FashionMNIST
from dinolike.training.loop import NonFiniteLossError, train


def run_cli(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dinolike.cli", "train", "--config", str(SMOKE),
           f"run.output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def teacher_state(out: Path) -> dict[str, torch.Tensor]:
    last = ck.list_checkpoints(out / "checkpoints")[-1]
    return ck.load_checkpoint(last)["model"]["teacher"]


def test_sigkill_then_resume_is_bit_exact_and_loss_goes_down(tmp_path: Path) -> None:
    common = ("optim.epochs=3", "run.checkpoint_every=7", "run.log_every=1")
    ref = tmp_path / "ref"
    p = run_cli(ref, *common)
    log = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, log

    # the same run, killed with SIGKILL after the checkpoint of iteration 14 exists, then resumed
    cut = tmp_path / "cut"
    p = run_cli(cut, *common)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "ckpt_0000014.pt").exists():
        assert p.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(r["iteration"] for r in rows(cut))
    assert 14 <= killed_at < 30
    p = run_cli(cut, *common)
    log = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, log

    resumed = [r["iteration"] for r in rows(cut)]
    # after the kill, logging restarts at the first iteration after the newest checkpoint
    restart = len(resumed) - 1 - resumed[::-1].index(15)
    assert resumed[restart:] == list(range(15, 31))
    assert resumed[:restart] == list(range(1, killed_at + 1))
    ref_t, cut_t = teacher_state(ref), teacher_state(cut)
    assert ref_t.keys() == cut_t.keys()
    for k in ref_t:
        assert torch.equal(ref_t[k], cut_t[k]), f"teacher weight {k} differs after resume"
    losses = [r["loss"] for r in rows(ref)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert (ref / "teacher_backbone.pth").is_file() and (ref / "config.yaml").is_file()
    # the exported backbone loads strictly into a fresh model and is the teacher's backbone
    from dinolike.interop import load_pretrained

    model, _ = load_pretrained(ref / "teacher_backbone.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_t["backbone." + k])


def test_nan_loss_stops_with_iteration_and_term_and_keeps_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import dinolike.training.ssl as ssl

    calls = {"n": 0}
    real = ssl.koleo_loss

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = real(x)
        return out * float("nan") if calls["n"] > 2 * 12 else out  # two calls per iteration

    monkeypatch.setattr(ssl, "koleo_loss", poisoned)
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.checkpoint_every=5"])
    with pytest.raises(NonFiniteLossError, match=r"koleo_loss is nan at iteration 12"):
        train(cfg)
    kept = ck.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept][-1] == "ckpt_0000010.pt"
    state = ck.load_checkpoint(kept[-1])
    assert all(torch.isfinite(v).all() for v in state["model"]["teacher"].values())


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    fm = FashionMNIST(split="train", limit=64)
    folder = tmp_path / "imgs" / "all"
    folder.mkdir(parents=True)
    for i in range(64):
        Image.fromarray(fm.images[i]).save(folder / f"{i:03d}.png")
    for i in range(3):
        (folder / f"bad{i}.png").write_bytes(b"definitely not a png")
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path / 'run'}", f"data.train=folder:{tmp_path / 'imgs'}",
                              "optim.epochs=1", "data.batch_size=16", "run.log_every=10",
                              "data.max_skipped_fraction=0.1"])  # 3 of 67 files: 4.5 %, near the default 5 %
    assert train(cfg) == 0
    last = rows(tmp_path / "run")[-1]
    # 10 iterations x 16 images = 160 positions over 67 files: each bad file is met 2 or 3 times
    assert last["skipped_files"] == 3 and 6 <= last["skipped_draws"] <= 9 and last["iteration"] == 10
