"""Fault injection into training: kill -9 anywhere, damaged checkpoints, a full disk, NaN weights, stops.

Every run is a real (tiny) training run on Fashion-MNIST; kills are real SIGKILLs of a subprocess
(tests/fault_driver.py). The claim of each test is FAULTS[key] in tests/faultlog.py, the table of
README's RELIABILITY section.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from faultlog import record

from dinolike.checkpoints import files as ck
from dinolike.commands import train as cli
from dinolike.config import load_config
from dinolike.training.loop import train
from dinolike.training.ssl import SSLMethod

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "fmnist_smoke.yaml"
DRIVER = REPO / "tests" / "fault_driver.py"
N, EVERY, BATCH = 9, 3, 8  # iterations, checkpoint interval, batch size
TINY = [f"data.batch_size={BATCH}", "data.limit=256", "model.depth=1", "crops.local_number=1", "heads.hidden_dim=32",
        "heads.out_dim=64", "heads.ibot_out_dim=64", "heads.bottleneck_dim=16", "run.log_every=1",
        f"run.checkpoint_every={EVERY}", "run.keep_last=2", f"optim.epochs={N / 10}", "optim.warmup_epochs=0.3",
        "teacher.warmup_temp_epochs=0.3", "collapse.enabled=false"]  # 10 iterations per epoch in the smoke recipe


def args(out: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"run.output_dir={out}", *TINY, *extra]


def run_driver(out: Path, kill: str | None = None, preexec=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), *(["--kill", kill] if kill else []), "--", *args(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, preexec_fn=preexec)


def teacher(out: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(ck.list_checkpoints(out / "checkpoints")[-1])["model"]["teacher"]


def assert_same_final_teacher(ref: Path, out: Path) -> None:
    a, b = teacher(ref), teacher(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"teacher weight {k} differs from the uninterrupted run"
    exported = torch.load(out / "teacher_backbone.pth", weights_only=True)
    for k, v in exported.items():
        assert torch.equal(v, a["backbone." + k]), f"exported {k} is not the final teacher"


def assert_export_is_checkpoint_teacher(out: Path, iteration: int) -> None:
    t = ck.load_checkpoint(ck.checkpoint_path(out / "checkpoints", iteration))["model"]["teacher"]
    exported = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert exported and all(torch.equal(v, t["backbone." + k]) for k, v in exported.items())


def ckpt_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_driver(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt_names(out) == ["ckpt_0000006.pt", "ckpt_0000009.pt"]
    return out


WRITE_PHASES = ("write-mid", "before-rename", "after-rename")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_points_and_during_a_checkpoint_write_then_resume_is_bit_exact(reference, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    it1, phase1 = rng.randrange(1, N - EVERY), rng.choice(["forward", "step"])
    write_phase, c2 = WRITE_PHASES[seed], rng.choice([c for c in range(EVERY, N, EVERY) if c > it1])

    r = run_driver(out, kill=f"{phase1}@{it1}")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert max(row["iteration"] for row in rows(out)) == it1  # died inside step it1, before it was logged

    r = run_driver(out, kill=f"{write_phase}@{c2}")  # resumes, then dies while writing checkpoint c2
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    names, final = ckpt_names(out), f"ckpt_{c2:07d}.pt"
    temps = [n for n in names if n.startswith(f".{final}.tmp")]
    if write_phase == "after-rename":
        assert final in names and not temps
    else:
        assert final not in names and len(temps) == 1  # the dead write's temp file is there ...

    r = run_driver(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt_names(out) == ["ckpt_0000006.pt", "ckpt_0000009.pt"]  # ... and gone after the resume
    assert_same_final_teacher(reference, out)
    where = {"forward": "before the forward pass", "step": "between optimizer step and EMA"}[phase1]
    record("kill-random", f"seed {seed}: killed {where} of step {it1}")
    record("kill-write", f"seed {seed}: killed {write_phase} of ckpt_{c2:07d}.pt")


def _flip_byte_inside_a_tensor(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor record (stored uncompressed in torch's zip):
    torch.load still succeeds and returns a wrong number; only the checksum can tell."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the local header precedes the record's bytes
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["iteration"] == N  # still loads: the damage is silent


DAMAGE = {
    "truncated": lambda p, run: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero-byte": lambda p, run: p.write_bytes(b""),
    "wrong-format": lambda p, run: shutil.copyfile(run / "teacher_backbone.pth", p),
    "byte-flipped": lambda p, run: _flip_byte_inside_a_tensor(p),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resume_falls_back_with_a_warning(reference, tmp_path, damage, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / "ckpt_0000009.pt"
    DAMAGE[damage](newest, out)
    with caplog.at_level("WARNING", logger="dinolike.train"):
        assert train(load_config(SMOKE, args(out)[2:])) == 0  # in-process: bit-equal to the subprocess runs
    warning = next(r.getMessage() for r in caplog.records if "ckpt_0000009.pt" in r.getMessage())
    assert "resuming from ckpt_0000006.pt" in warning and "ckpt_0000009.pt.damaged" in warning
    assert ckpt_names(out) == ["ckpt_0000006.pt", "ckpt_0000009.pt", "ckpt_0000009.pt.damaged"]
    assert_same_final_teacher(reference, out)
    record("ckpt-damaged", f"{damage}: {warning.split(';')[0]}")


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for p in ck.list_checkpoints(out / "checkpoints"):
        p.write_bytes(p.read_bytes()[:1000])
    before = ckpt_names(out)
    assert cli.main(["train", *args(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no intact checkpoint" in err and "ckpt_0000006.pt" in err
    assert ckpt_names(out) == before  # nothing renamed, nothing new: every rerun stops here
    record("ckpt-all-damaged", err)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "ckpt_0000009.pt").unlink()  # the rerun resumes at 6 and must write 9
    limit = (out / "checkpoints" / "ckpt_0000006.pt").stat().st_size // 2

    def small_disk() -> None:  # `ulimit -f`: writes past `limit` bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run_driver(out, preexec=small_disk)
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("dinolike train: error: cannot write checkpoint") and "ckpt_0000009.pt: File too large" in err
    assert "ckpt_0000006.pt is intact" in err
    assert ckpt_names(out) == ["ckpt_0000006.pt"]  # no temp file left behind to fill the disk further
    assert ck.load_checkpoint(out / "checkpoints" / "ckpt_0000006.pt")["iteration"] == 6
    assert train(load_config(SMOKE, args(out)[2:])) == 0  # space freed: the run completes as if nothing happened
    assert_same_final_teacher(reference, out)
    record("disk-full", err)


def test_nan_in_student_weights_stops_naming_iteration_and_term(tmp_path, monkeypatch, capsys):
    real = SSLMethod.forward_loss

    def poisoned(self, batch, sched, *phase):
        if int(batch["positions"][0]) // BATCH == 4:  # step 4: after checkpoint 3, before checkpoint 6
            with torch.no_grad():
                next(self.student.parameters()).view(-1)[0] = float("nan")
        return real(self, batch, sched, *phase)

    monkeypatch.setattr(SSLMethod, "forward_loss", poisoned)
    out = tmp_path / "run"
    assert cli.main(["train", *args(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and " is nan at iteration 4" in err and "_loss is nan" in err
    assert ckpt_names(out) == ["ckpt_0000003.pt"]
    state = ck.load_checkpoint(out / "checkpoints" / "ckpt_0000003.pt")  # verifies the checksum too
    assert not ck.non_finite_tensors(state["model"])
    assert not (out / "teacher_backbone.pth").exists()
    record("nan-weights", err)


def test_nan_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    """The finite check rides in the gradient all-reduce: rank 0 never sees a NaN itself, yet must stop at the
    same step as rank 1 (a rank that went on would wait forever in the next collective)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER),
           "--nan", "1@4", "--", *args(out, f"data.batch_size={BATCH // 2}", "dist.local_processes=1")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(k, None)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "dinolike train: error:" in line]
    assert len(errors) == 2, r.stderr[-3000:]  # both ranks, each one line
    assert all("koleo_loss is nan at iteration 4 (summed over ranks)" in line for line in errors), errors
    assert ckpt_names(out) == ["ckpt_0000003.pt"]
    assert not ck.non_finite_tensors(ck.load_checkpoint(out / "checkpoints" / "ckpt_0000003.pt")["model"])
    assert not (out / "teacher_backbone.pth").exists()
    record("nan-one-rank", errors[0])


def test_a_state_holding_nan_is_never_checkpointed(tmp_path):
    good = {"model": {"student": {"w": torch.ones(3)}}, "optimizer": {}, "iteration": 5, "config": "{}"}
    ck.save_checkpoint(tmp_path, 5, good, keep_last=2)
    bad = {**good, "model": {"student": {"w": torch.tensor([1.0, float("nan"), 1.0])}}, "iteration": 6}
    with pytest.raises(ck.NonFiniteStateError, match=r"iteration 6: model\.student\.w holds NaN/inf") as e:
        ck.save_checkpoint(tmp_path, 6, bad, keep_last=2)
    assert "ckpt_0000005.pt is intact" in str(e.value)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_0000005.pt"]
    record("nan-checkpoint", str(e.value))


def _labelled_folder(root: Path, per_class: int = 10) -> Path:
    from PIL import Image

    from dinolike.data.datasets import FashionMNIST

    fm = FashionMNIST(split="test", limit=200)
    for c in (0, 1):
        (root / str(c)).mkdir(parents=True)
        for i in [j for j in range(len(fm)) if fm.labels[j] == c][:per_class]:
            Image.fromarray(fm.images[i]).save(root / str(c) / f"{i}.png")
    return root


@pytest.mark.parametrize("how", ["time-limit", "SIGTERM"])
def test_a_stopped_run_leaves_the_teacher_of_its_iteration(tmp_path, monkeypatch, capsys, how):
    out = tmp_path / "run"
    if how == "time-limit":  # the limit is over after the first step; the final kNN must find its teacher
        bank = _labelled_folder(tmp_path / "bank")
        monkeypatch.setenv("DINOLIKE_FEATURE_CACHE", str(tmp_path / "cache"))
        extra = ["run.time_limit_min=1e-9", "eval.final_knn=true", f"eval.final_train=folder:{bank}",
                 f"eval.final_val=folder:{bank}"]
        status, stop_at = 0, 1
    else:
        real = SSLMethod.forward_loss

        def preempted(self, batch, sched, *phase):  # SLURM's SIGTERM arrives during step 1
            if int(batch["positions"][0]) // BATCH == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, batch, sched, *phase)

        monkeypatch.setattr(SSLMethod, "forward_loss", preempted)
        extra, status, stop_at = [], 3, 2
    assert cli.main(["train", *args(out), *extra]) == status
    err = capsys.readouterr().err
    assert f"stopped at iteration {stop_at}" in err and f"teacher of iteration {stop_at} exported" in err
    assert ckpt_names(out) == [f"ckpt_{stop_at:07d}.pt"]
    assert_export_is_checkpoint_teacher(out, stop_at)
    if how == "time-limit":
        assert "k20_top1" in json.loads((out / "eval_knn" / "results.json").read_text())["metrics"]
    line = next(ln for ln in err.splitlines() if "stopped at" in ln)
    record("stop-time-limit" if how == "time-limit" else "stop-signal",
           line + (", final kNN written" if how == "time-limit" else f", exit {status}"))
