"""Traps that used to waste a user's time silently: constant embeddings, Ctrl-C, a full disk, bad settings,
a resume with a changed config, an empty log.txt, a GPU recipe started on a CPU.

Real (tiny) training runs on Fashion-MNIST or on RGB folders made from it; signals are real signals, the
full disk a real tmpfs (root only). Each test's claim is FAULTS[key] in tests/faultlog.py, the table of
BENCHMARKS.md section 7.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faultlog import record
from PIL import Image
from testkit import no_training_step

from dinolike.checkpoints import files as ck
from dinolike.commands import export as export_cmd
from dinolike.commands import train as cli
from dinolike.config import load_config
from dinolike.data.datasets import FashionMNIST
from dinolike.eval.spread import CONSTANT_COSINE, backbone_cls_cosine, mean_pairwise_cosine
from dinolike.models import build_backbone
from dinolike.training import loop
from dinolike.training.collapse import CollapseError, CollapseWatch
from dinolike.training.estimate import estimate_seconds_per_iteration
from dinolike.training.summary import cpu_warning
from dinolike.training.validate import check_train_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "fmnist_smoke.yaml"
FOLDER_RECIPE = REPO / "configs" / "folder_vits14.yaml"
TINY = ["data.batch_size=8", "data.limit=256", "model.depth=1", "crops.local_number=1", "heads.hidden_dim=32",
        "heads.out_dim=64", "heads.ibot_out_dim=64", "heads.bottleneck_dim=16", "run.log_every=1",
        "run.checkpoint_every=3", "run.keep_last=2", "optim.warmup_epochs=0.3", "teacher.warmup_temp_epochs=0.3",
        "collapse.enabled=false"]  # 10 iterations per epoch in the smoke recipe


def smoke(out: Path, *extra: str, epochs: float = 0.9) -> list[str]:
    return ["train", "--config", str(SMOKE), f"run.output_dir={out}", *TINY, f"optim.epochs={epochs}", *extra]


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rgb_folder(root: Path, n: int = 48, size: int = 32) -> Path:
    """Tinted, upscaled Fashion-MNIST images as RGB JPEGs: a user's photo folder in small."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i, img in enumerate(FashionMNIST(split="train", limit=n).images):
        g = img.astype(np.float32)[..., None] / 255
        rgb = g * rng.uniform(0.3, 1.0, 3) + (1 - g) * rng.uniform(0.0, 0.3)
        Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size)).save(root / f"{i}.jpg")
    return root


def ckpt_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ------------------------------------------------------------------------------ 1. constant embeddings


def test_cosine_of_identical_and_of_random_vit_embeddings() -> None:
    z = torch.randn(1, 16).repeat(8, 1)
    assert mean_pairwise_cosine(z).item() == pytest.approx(1.0, abs=1e-6)
    assert abs(mean_pairwise_cosine(torch.randn(64, 128)).item()) < 0.05  # random directions
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine(z[:1])
    # a new ViT with LayerScale 1e-5 gives every input the same CLS token; with 0.1 or 1 it does not
    cos = {}
    for ls in (1e-5, 0.1, 1.0):
        torch.manual_seed(0)
        vit = build_backbone({"arch": "vit_pico", "patch_size": 7, "img_size": 28, "in_chans": 1, "layerscale": ls})
        cos[ls] = backbone_cls_cosine(vit, channels=1, size=28)
    assert cos[1e-5] >= CONSTANT_COSINE > cos[0.1] > cos[1.0]


def test_watch_warns_of_constant_embeddings_from_the_first_row_and_fails_a_run_ending_so() -> None:
    row = {"dino_global_loss": 5.0, "teacher_entropy": 5.5, "student_mean_entropy": 5.5, "cls_cosine": 1.0}
    w = CollapseWatch(n_prototypes=256, start_iters=1000, patience_iters=100, layerscale=1e-5)
    warning = w.update(10, row)  # long before the end of the warmup
    assert warning and "iteration 10: constant embeddings" in warning and "model.layerscale=1e-05" in warning
    assert "stops if this lasts to iteration 1100" in warning
    assert w.update(20, row) is None  # once per run
    with pytest.raises(CollapseError, match="training ended at iteration 20 with constant embeddings"):
        w.final_verdict(20, "ckpt_0000020.pt")
    w.update(30, {**row, "cls_cosine": 0.5})
    w.final_verdict(30, "ckpt_0000030.pt")  # grew out of it: no verdict
    with pytest.raises(CollapseError, match="stayed collapsed to iteration 1100: constant embeddings"):
        for it in range(1000, 1101, 10):
            w.update(it, row)
    off = CollapseWatch(n_prototypes=256, enabled=False)
    assert off.update(10, row) is None
    off.final_verdict(10, "x")


def _folder_run(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """The issue's trial in small: configs/folder_vits14.yaml shrunk to a CPU (ViT pico, 32/16 px crops,
    8 iterations) on an RGB folder, with the recipe's LayerScale unless `extra` sets one."""
    folder = tmp_path / "photos"
    if not folder.exists():
        rgb_folder(folder)
    return ["train", "--config", str(FOLDER_RECIPE), f"data.train=folder-nolabels:{folder}", "model.arch=vit_pico",
            "model.patch_size=8", "model.img_size=32", "crops.global_size=32", "crops.local_size=16",
            "crops.local_number=2", "heads.out_dim=256", "heads.ibot_out_dim=256", "heads.hidden_dim=64",
            "heads.bottleneck_dim=32", "data.batch_size=8", "data.num_workers=0", "data.pin_memory=false",
            "run.device=cpu", "run.progress=false", "run.log_every=2", "run.checkpoint_every=4",
            "optim.epochs=0.008", "run.tensorboard=false", f"run.output_dir={out}", *extra]


def test_a_run_that_ends_with_constant_embeddings_fails_and_its_backbone_is_not_exported(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_folder_run(tmp_path, out, "model.layerscale=1e-5")) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "training ended at iteration 8 with constant embeddings" in err and "model.layerscale=0.1" in err
    assert not (out / "teacher_backbone.pth").exists() and ckpt_names(out) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    assert cli.main(_folder_run(tmp_path, out, "model.layerscale=1e-5")) == 1  # run again: still no export
    assert "training ended at iteration 8 with constant embeddings" in one_line_error(capsys.readouterr().err)
    assert not (out / "teacher_backbone.pth").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["cls_cosine"] >= CONSTANT_COSINE for r in rows)
    log = (out / "log.txt").read_text()
    assert "iteration 2: constant embeddings" in log  # warned at the first row, long before the end
    assert "error: CollapseError: training ended at iteration 8" in log
    # the checkpoint is refused by export, and marked when the user insists
    assert export_cmd.main([str(out / "checkpoints" / "ckpt_0000008.pt"), "--format", "official", "--out",
                            str(tmp_path / "exp")]) == 2
    refused = one_line_error(capsys.readouterr().err)
    assert "refusing to export" in refused and "--allow-collapsed" in refused
    assert export_cmd.main([str(out / "checkpoints" / "ckpt_0000008.pt"), "--format", "official", "--out",
                            str(tmp_path / "exp"), "--allow-collapsed"]) == 0
    assert "**Warning: collapsed backbone.**" in (tmp_path / "exp" / "README.md").read_text()
    # the recipe's own LayerScale (0.1 for ViT-S/14 since issue 32) learns from the first iterations
    out2 = tmp_path / "run_recipe"
    assert cli.main(_folder_run(tmp_path, out2)) == 0
    assert (out2 / "teacher_backbone.pth").is_file()
    assert "constant embeddings" not in (out2 / "log.txt").read_text()
    record("constant-embeddings", f"{err.split(': ', 1)[1][:150]}...; export: {refused.split(': ', 2)[2][:80]}...")


# ------------------------------------------------------------------------------------ 2. no --config


def test_train_without_a_config_names_the_recipes_instead_of_starting_vit_large(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "--config" in err and "fmnist_cpu.yaml" in err and "folder_vits14.yaml" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    record("no-config", err)


# ------------------------------------------------------------------------------------------ 3. Ctrl-C


@pytest.mark.parametrize(("processes", "workers"), [(1, 0), (2, 0), (1, 2)])
def test_ctrl_c_stops_with_a_checkpoint_and_the_teacher_export(tmp_path, processes, workers):
    """A real SIGINT to a real `dinolike train`, as a terminal's Ctrl-C sends it (to the whole foreground
    process group: with 2 processes the children sit in their own session and hear it from the parent;
    data-loader workers hear it too, and must neither die nor speak)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dinolike.cli", *smoke(out, f"dist.local_processes={processes}",
                                                         f"data.num_workers={workers}", epochs=100)]
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert p.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count("Ctrl-C: stopping after this iteration") == 1, err
    line = next(ln for ln in err.splitlines() if ln.startswith("stopped at iteration"))
    it = int(line.split()[3])
    reason = "SIGINT" if processes == 1 else "SIGTERM"  # the parent turns Ctrl-C into SIGTERM for its children
    assert f"({reason}); checkpoint saved and teacher of iteration {it} exported" in line
    assert f"ckpt_{it:07d}.pt" in ckpt_names(out)
    teacher = ck.load_checkpoint(ck.checkpoint_path(out / "checkpoints", it))["model"]["teacher"]
    exported = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(v, teacher["backbone." + k]) for k, v in exported.items())
    assert line in (out / "log.txt").read_text()
    record("ctrl-c", f"{processes} process(es), {workers} loader workers: {line}, exit 3")


def test_a_second_ctrl_c_aborts_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    from dinolike.training.ssl import SSLMethod

    real = SSLMethod.forward_loss

    def impatient(self, batch, sched, *phase):  # Ctrl-C twice during step 4 (after checkpoint 3)
        if int(batch["positions"][0]) // 8 == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, sched, *phase)

    monkeypatch.setattr(SSLMethod, "forward_loss", impatient)
    out = tmp_path / "run"
    assert cli.main(smoke(out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted; the newest checkpoint" in err
    assert ckpt_names(out) == ["ckpt_0000003.pt"]
    assert "error: interrupted (Ctrl-C)" in (out / "log.txt").read_text()


# ------------------------------------------------------------------------------------- 4. a full disk


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs (root only); yields a function that (re)mounts it with a size in bytes."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def mount(size: int, options: str = "") -> Path:
        opts = f"size={size}" + (f",{options}" if options else "")
        verb = ["-o", f"remount,{opts}"] if mounted else ["-t", "tmpfs", "-o", opts, "tmpfs"]
        r = subprocess.run(["mount", *verb, str(mnt)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_small_filesystem_is_one_line_and_loses_nothing(tmp_path, tmpfs, capsys):
    ref = tmp_path / "ref"
    assert cli.main(smoke(ref)) == 0
    size_9 = (ref / "checkpoints" / "ckpt_0000009.pt").stat().st_size
    disk = tmpfs(64 << 20)
    out = disk / "run"
    shutil.copytree(ref, out)
    (out / "checkpoints" / "ckpt_0000009.pt").unlink()  # the rerun resumes at 6 and must write 9
    (out / "teacher_backbone.pth").unlink()
    used = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    tmpfs(used + size_9 // 2 + 64 * 1024)  # room for the logs, not for another checkpoint
    capsys.readouterr()
    assert cli.main(smoke(out)) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "cannot write checkpoint" in err and "ckpt_0000009.pt: No space left on device" in err
    assert "the previous checkpoint" in err and "ckpt_0000006.pt is intact" in err
    assert ckpt_names(out) == ["ckpt_0000006.pt"]  # no temp file left to fill the disk
    assert ck.load_checkpoint(out / "checkpoints" / "ckpt_0000006.pt")["iteration"] == 6
    tmpfs(64 << 20)  # space freed: the same command completes as if nothing happened
    assert cli.main(smoke(out)) == 0
    a = ck.load_checkpoint(ref / "checkpoints" / "ckpt_0000009.pt")["model"]["teacher"]
    b = ck.load_checkpoint(out / "checkpoints" / "ckpt_0000009.pt")["model"]["teacher"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    record("disk-full-tmpfs", err)


# ------------------------------------------------------------------------- 5. output_dir, bad values


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tmp_path, tmpfs, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    assert cli.main(smoke(a_file)) == 2
    err_file = one_line_error(capsys.readouterr().err)
    assert "is a file, not a folder" in err_file
    read_only = tmpfs(1 << 20, "ro")
    assert cli.main(smoke(read_only / "run")) == 2
    err_ro = one_line_error(capsys.readouterr().err)
    assert "is not writable (Read-only file system)" in err_ro
    record("output-dir", f"{err_file}; {err_ro}")


BAD_VALUES = {
    "optim.base_lr=-0.001": "optim.base_lr must be in (0, 1], got -0.001",
    "optim.weight_decay=-0.04": "optim.weight_decay must be in [0, 1], got -0.04",
    "optim.min_lr=0.5": "optim.min_lr (0.5) must not exceed optim.base_lr",
    "teacher.momentum=1.2": "teacher.momentum must be in [0, 1], got 1.2",
    "teacher.final_momentum=1.01": "teacher.final_momentum must be in [0, 1], got 1.01",
    "optim.betas=[0.9,1.5]": "optim.betas values must be in [0, 1), got [0.9, 1.5]",
    "crops.local_scale=[0.5,0.05]": "crops.local_scale must be [low, high] with low <= high",
}


def test_absurd_values_are_refused_before_any_work(tmp_path, capsys):
    seen = []
    for override, message in BAD_VALUES.items():
        out = tmp_path / override.split("=")[0]
        assert cli.main(smoke(out, override)) == 2, override
        err = one_line_error(capsys.readouterr().err)
        assert message in err, err
        assert not out.exists()
        seen.append(err.split("error: ")[1])
    for recipe in sorted((REPO / "configs").glob("*.yaml")):  # every shipped recipe passes
        check_train_config(load_config(recipe))
    record("bad-values", "; ".join(seen[:4]) + f"; ... ({len(seen)} refused)")


# ---------------------------------------------------------------------- 6. resume with another config


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(smoke(out)) == 0  # 9 iterations
    config_before, ckpts_before = (out / "config.yaml").read_text(), ckpt_names(out)
    capsys.readouterr()
    assert cli.main(smoke(out, "optim.base_lr=0.002", epochs=3.6)) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "ckpt_0000009.pt was written with other settings" in err
    assert "optim.base_lr: 0.004 -> 0.002" in err and "optim.epochs: 0.9 -> 3.6" in err
    assert "run.allow_config_change=true" in err
    assert (out / "config.yaml").read_text() == config_before and ckpt_names(out) == ckpts_before
    # operational keys may differ: nothing to do, not refused
    assert cli.main(smoke(out, "run.log_every=3", "run.checkpoint_every=2", "run.progress=true")) == 0
    # the explicit switch resumes with the change, and says so in log.txt
    assert cli.main(smoke(out, "run.allow_config_change=true", epochs=1.8)) == 0
    assert ckpt_names(out)[-1] == "ckpt_0000018.pt"
    assert "with changed settings (run.allow_config_change=true): optim.epochs: 0.9 -> 1.8" in (
        out / "log.txt").read_text()
    assert "epochs: 1.8" in (out / "config.yaml").read_text()
    record("resume-changed-config", err)


# ----------------------------------------------------------------------------------------- 7. log.txt


def test_log_txt_and_the_terminal_tell_the_whole_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(smoke(out)) == 0  # run.progress=false in the smoke recipe
    term, log = capsys.readouterr().out, (out / "log.txt").read_text()  # the report on stdout
    for text in (f"run {out}: new run", "fmnist:train: 256 images", "estimate  timing the first iterations",
                 "iteration 1/9 | loss ",
                 "iteration 9/9 | loss ", "finished: iteration 9 of 9"):
        assert text in term and text in log, text
    # a damaged checkpoint on resume: the warning lands in log.txt; then a fatal error does too
    (out / "checkpoints" / "ckpt_0000009.pt").write_bytes(b"")
    assert cli.main(smoke(out)) == 0
    log = (out / "log.txt").read_text()
    assert "ckpt_0000009.pt: EOFError" in log and "resuming from ckpt_0000006.pt" in log
    assert "resuming at iteration 6 from ckpt_0000006.pt" in log
    broken = tmp_path / "broken"  # a folder whose only image is unreadable: the run fails inside
    broken.mkdir()
    (broken / "0.png").write_bytes(b"not a png")
    assert cli.main(smoke(out, f"data.train=folder:{broken}", "run.allow_config_change=true", epochs=1.8)) == 2
    last = (out / "log.txt").read_text().strip().splitlines()[-1]
    assert " error: " in last and str(broken) in last
    record("log-txt", f"clean run: {len(log.splitlines())} lines (summary, rows, end); last line of a failed "
                      f"run: {last.split(' ', 2)[2][:100]}")


# --------------------------------------------------------------------------------------- 8. no GPU


def test_a_gpu_recipe_on_the_cpu_says_so_with_its_time_before_the_first_step(tmp_path, monkeypatch, caplog):
    FirstStep = no_training_step(monkeypatch)  # noqa: N806 - an exception class
    folder = rgb_folder(tmp_path / "photos", n=8, size=64)
    cfg = load_config(FOLDER_RECIPE, [f"data.train=folder-nolabels:{folder}", "data.num_workers=0",
                                      "data.batch_size=2", "run.device=cpu", "run.tensorboard=false",
                                      f"run.output_dir={tmp_path / 'run'}"])
    with caplog.at_level("WARNING", logger="dinolike.train"), pytest.raises(FirstStep):
        loop.train(cfg)
    warning = next(r.getMessage() for r in caplog.records if "training on the CPU" in r.getMessage())
    assert "run.device=cpu" in warning and ("days" in warning or "years" in warning)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert warning in log and "estimate  timing the first iterations" in log  # no step: no measured estimate
    # the CPU main job is what a CPU is for: no warning
    small = load_config(REPO / "configs" / "fmnist_cpu.yaml")
    vit = build_backbone(small.model)
    seconds = estimate_seconds_per_iteration(small, vit, torch.device("cpu")) * 5154
    assert cpu_warning(small, torch.device("cpu"), seconds) is None, seconds
    record("cpu-estimate", warning)
