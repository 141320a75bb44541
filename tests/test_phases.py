"""The high-res phase and distillation through the one training loop, on real Fashion-MNIST subsets.

A tiny pretraining run (module fixture) is the low-res checkpoint and the distillation teacher; every
run here is a handful of iterations of a 1-2 block ViT on 64 images.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from testkit import SMOKE, rows

import dinolike.training.loop as loop
from dinolike.checkpoints import files as ck
from dinolike.commands.train import main as train_cli
from dinolike.config import load_config
from dinolike.interop import load_pretrained
from dinolike.training.schedules import build_schedules

TINY = [  # smaller than the smoke recipe: 64 images, batches of 8, small heads, a log row per iteration
    "data.limit=64", "data.batch_size=8", "heads.out_dim=64", "heads.ibot_out_dim=64", "heads.hidden_dim=32",
    "heads.bottleneck_dim=16", "run.log_every=1", "run.progress=false", "optim.epoch_length=4",
]
PRE_ITERS = 4  # the pretraining fixture: 1 epoch of 4 iterations at 28 px


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on a busy 2-core machine make these tiny models ~5x slower (OpenMP spinning)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished low-res (28 px) pretraining run: vit_pico, 2 blocks, 4 iterations."""
    out = tmp_path_factory.mktemp("pre")
    cfg = load_config(SMOKE, [*TINY, f"run.output_dir={out}", "optim.epochs=1", "run.checkpoint_every=4"])
    assert loop.train(cfg) == 0
    return out


def last_ckpt(out: Path) -> dict:
    return ck.load_checkpoint(ck.list_checkpoints(out / "checkpoints")[-1])


def capture_method(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Patch the loop's build_method to keep the method, its initial state and per-forward counters."""
    seen: dict = {}
    real = loop.build_method

    def build(cfg):
        method = real(cfg)
        seen["method"] = method
        seen["init"] = {k: v.detach().clone() for k, v in method.state_dict().items()}
        counts = seen.setdefault("calls", {})

        def counter(name: str):
            def hook(*_):
                counts[name] = counts.get(name, 0) + 1
            return hook

        # patch_embed runs once per crop tensor: 1 per iteration for the teacher (global crops),
        # 2 per iteration for a student (global + local crops); the heads once per call
        method.teacher["backbone"].patch_embed.register_forward_hook(counter("teacher"))
        method.teacher["dino_head"].register_forward_hook(counter("teacher_head"))
        for i, s in enumerate(method.students):
            s["backbone"].patch_embed.register_forward_hook(counter(f"student{i}"))
        return method

    monkeypatch.setattr(loop, "build_method", build)
    return seen


@pytest.fixture(scope="module")
def distilled(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three students of different sizes distilled from the pretrained run by `dinolike distill`."""
    tmp = tmp_path_factory.mktemp("distill")
    recipe = tmp / "multi.yaml"
    recipe.write_text(
        f"base: {SMOKE}\n"
        "model: {depth: 1}\n"
        "masking: {probability: 0.0}\n"
        "distill:\n  students:\n    - {depth: 2}\n    - {embed_dim: 48, num_heads: 2}\n"
    )
    out = tmp / "run"
    mp = pytest.MonkeyPatch()
    seen = capture_method(mp)
    try:
        status = train_cli(["distill", "--config", str(recipe), "--teacher", str(pretrained), *TINY,
                            f"run.output_dir={out}", "optim.epochs=1", "optim.epoch_length=3",
                            "heads.out_dim=32", "heads.ibot_out_dim=32"])  # the teacher's heads win
    finally:
        mp.undo()
    assert status == 0
    return {**seen, "out": out, "iters": 3, "teacher_ckpt": last_ckpt(pretrained)}


# ---- distillation ----------------------------------------------------------------------------------
def test_distillation_teacher_is_frozen_bit_for_bit(distilled: dict) -> None:
    method = distilled["method"]
    saved = distilled["teacher_ckpt"]["model"]["teacher"]
    now = method.teacher.state_dict()
    assert now.keys() == saved.keys()
    for k, v in now.items():
        assert torch.equal(v, saved[k]), f"teacher {k} changed during distillation"
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())


def test_distillation_trains_every_student_and_its_ema(distilled: dict) -> None:
    method, init = distilled["method"], distilled["init"]
    for part in ("students", "emas"):
        for i in range(3):
            prefix = f"{part}.{i}.backbone.blocks.0.attn.qkv.weight"
            assert not torch.equal(method.state_dict()[prefix], init[prefix]), f"{prefix} did not move"
    # gradients are clipped per student: three disjoint groups that together hold every trained parameter
    groups = [{id(p) for p in g} for g in method.grad_clip_groups()]
    assert len(groups) == 3 and not (groups[0] & groups[1]) and not (groups[1] & groups[2])
    assert set().union(*groups) == {id(p) for p in method.students.parameters()}
    # the EMA trails the student: it moved, but less far than the student itself
    s0, e0 = method.students[0].state_dict(), method.emas[0].state_dict()
    k = "backbone.blocks.0.attn.qkv.weight"
    start = init["students.0." + k]
    assert 0 < (e0[k] - start).norm() < (s0[k] - start).norm()


def test_multi_student_runs_one_teacher_pass_per_batch(distilled: dict) -> None:
    calls, n = distilled["calls"], distilled["iters"]
    assert calls["teacher"] == n  # one teacher forward per batch ...
    assert calls["teacher_head"] == n
    assert [calls[f"student{i}"] for i in range(3)] == [2 * n] * 3  # ... feeds all three students
    metrics = rows(distilled["out"])
    assert [r["iteration"] for r in metrics] == [1, 2, 3]
    for r in metrics:  # every student has its own losses; the logged loss is their sum
        # student 0's loss from its terms: 2 global + 2 local crops = 4 + 4 crop pairs, KoLeo weight 0.1
        dino0 = (4 * r["dino_local_loss"] + 4 * r["dino_global_loss"]) / 6
        loss0 = dino0 + r["ibot_loss"] + 0.1 * r["koleo_loss"]
        assert r["loss"] == pytest.approx(loss0 + r["student1_loss"] + r["student2_loss"], rel=1e-5)
        assert r["student1_ibot_loss"] > 0 and r["student2_dino_local_loss"] > 0


def test_multi_student_exports_each_students_ema(distilled: dict) -> None:
    method, out = distilled["method"], distilled["out"]
    files = ["teacher_backbone.pth", "student1_backbone.pth", "student2_backbone.pth"]
    shapes = [(1, 96), (2, 96), (1, 48)]  # (blocks, width) of model, students[0], students[1]
    for i, (name, (depth, dim)) in enumerate(zip(files, shapes, strict=True)):
        model, cfg = load_pretrained(out / name)
        assert (model.n_blocks, model.embed_dim) == (depth, dim)
        ema = method.emas[i]["backbone"].state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema[k]), f"{name}: {k} is not student {i}'s EMA"
    # the students predict over the teacher's 64 prototypes (not the 32 asked for): the saved config says so
    saved = load_config(out / "config.yaml")
    assert saved.heads.out_dim == saved.heads.ibot_out_dim == 64 and saved.distill.teacher
    assert all(s["dino_head"].last_layer.weight_v.shape[0] == 64 for s in method.students)


def test_bench_times_the_loops_step_and_clips_per_student(pretrained: Path, monkeypatch) -> None:
    """`dinolike bench` runs the loop's train_step: distillation is clipped per student there too."""
    from dinolike.bench import run_bench

    clipped: list[int] = []
    real = torch.nn.utils.clip_grad_norm_

    def record(params, *args, **kwargs):
        clipped.append(len(list(params)))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    cfg = load_config(SMOKE, [*TINY, f"distill.teacher={pretrained}", "model.depth=1",
                              "distill.students=[{depth: 2}]"])
    res = run_bench(cfg, iters=1, warmup=0, synthetic=True)
    assert set(res["breakdown_ms"]) == {"data", "teacher_forward", "student_forward_and_losses", "backward",
                                        "optimizer", "ema"}
    method = loop.build_method(cfg)
    # two steps (one phase-timed, one back to back), each clipped per student
    assert clipped == [len(g) for g in method.grad_clip_groups()] * 2 and len(clipped) == 4


def test_distillation_resumes_bit_exact(pretrained: Path, tmp_path: Path) -> None:
    args = [*TINY, f"distill.teacher={pretrained}", "model.depth=1", "masking.probability=0.0",
            "optim.epochs=1", "run.checkpoint_every=2"]
    full = tmp_path / "full"
    assert loop.train(load_config(SMOKE, [*args, f"run.output_dir={full}"])) == 0
    cut = tmp_path / "cut"  # the same run, as if it had died after the checkpoint of iteration 2
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "ckpt_0000004.pt").unlink()
    assert loop.train(load_config(SMOKE, [*args, f"run.output_dir={cut}"])) == 0
    a, b = last_ckpt(full), last_ckpt(cut)
    assert a["iteration"] == b["iteration"] == 4
    for part in ("students", "emas"):
        for k, v in a["model"][part].items():
            assert torch.equal(v, b["model"][part][k]), f"{part} {k} differs after resume"
    assert [r["iteration"] for r in rows(cut)][-2:] == [3, 4]


def test_bad_teachers_and_students_are_clear_errors(pretrained: Path, tmp_path: Path) -> None:
    from dinolike.training.distill import DistillMethod

    def method(*overrides: str) -> DistillMethod:
        return DistillMethod(load_config(SMOKE, [*TINY, *overrides]))

    with pytest.raises(ValueError, match=r"4x4.*teacher.*7x7|7x7.*teacher.*4x4"):
        method(f"distill.teacher={pretrained}", "model.patch_size=4")
    with pytest.raises(ValueError, match=r"distill\.students\[0\] has keys \['detph'\]"):
        method(f"distill.teacher={pretrained}", "distill.students=[{detph: 2}]")
    with pytest.raises(FileNotFoundError, match="distill.teacher: no checkpoint"):
        method(f"distill.teacher={tmp_path}")
    # a distillation checkpoint has students, not a teacher
    out = tmp_path / "d"
    cfg = load_config(SMOKE, [*TINY, f"distill.teacher={pretrained}", "model.depth=1", "optim.epochs=1",
                              "optim.epoch_length=1", f"run.output_dir={out}"])
    assert loop.train(cfg) == 0
    with pytest.raises(RuntimeError, match="not a pretraining 'teacher'"):
        method(f"distill.teacher={out}")


# ---- the high-res phase ----------------------------------------------------------------------------
def test_highres_phase_continues_a_lowres_run_at_56px(pretrained: Path, tmp_path: Path) -> None:
    src = last_ckpt(pretrained)
    out = tmp_path / "hr"
    cfg = load_config(SMOKE, [*TINY, f"run.output_dir={out}", f"run.init_from={pretrained}",
                              "crops.global_size=56", "crops.local_size=28", "optim.epochs=2"])
    assert loop.train(cfg) == 0
    got = rows(out)
    # the iteration and the schedules continue from the checkpoint (iteration 5 uses schedule step 4)
    assert [r["iteration"] for r in got] == [5, 6, 7, 8]
    sched = build_schedules(cfg, cfg.data.batch_size)
    assert got[0]["lr"] == pytest.approx(sched.lr[PRE_ITERS]) and got[0]["lr"] != pytest.approx(sched.lr[0])
    assert all("ibot_loss" in r for r in got)  # masks on the 8 x 8 grid of a 56 px crop (patch 7)
    end = last_ckpt(out)
    assert end["iteration"] == 2 * PRE_ITERS
    # the optimizer state came along: AdamW's step counter continued from the low-res run
    steps = {float(s["step"]) for s in end["optimizer"]["state"].values()}
    assert steps == {2.0 * PRE_ITERS}
    # the position embedding keeps its learned 4 x 4 grid (+ CLS), was trained further, and is
    # interpolated to 8 x 8 when the exported backbone sees 56 px images
    k = "backbone.pos_embed"
    assert end["model"]["teacher"][k].shape == src["model"]["teacher"][k].shape == (1, 17, 96)
    assert not torch.equal(end["model"]["teacher"][k], src["model"]["teacher"][k])
    model, _ = load_pretrained(out / "teacher_backbone.pth")
    x = torch.randn(3, 1, 56, 56)
    feats = model.forward_features(x)
    assert feats["x_norm_patchtokens"].shape == (3, 8 * 8, 96)
    assert torch.isfinite(feats["x_norm_clstoken"]).all()


def test_phase_that_does_not_extend_the_schedule_is_refused(pretrained: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(SMOKE, [*TINY, f"run.output_dir={tmp_path}", f"run.init_from={pretrained}",
                              "crops.global_size=56", "optim.epochs=1"])
    assert loop.train(cfg) == 2
    assert "must set a larger optim.epochs" in capsys.readouterr().err
    assert not ck.list_checkpoints(tmp_path / "checkpoints")
