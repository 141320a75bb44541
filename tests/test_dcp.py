"""Sharded (DCP) checkpoint folders in one process: round trip of model and optimizer, the integrity
manifest, fallback past a damaged / incomplete folder, removal of a crashed write, keep_last, NaN refusal.
The 2-process kill -9 and world-size changes are in test_scale_resume.py."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dinolike.checkpoints import dcp
from dinolike.checkpoints import files as ck


class Tiny(nn.Module):
    """The method interface the checkpoint code uses: checkpointed_parts() and .student."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = nn.Linear(8, 4), nn.Linear(8, 4)

    def checkpointed_parts(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}


def trained(seed: int) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = Tiny()
    opt = torch.optim.AdamW(m.student.parameters(), lr=0.1)
    m.student(torch.randn(3, 8)).sum().backward()
    opt.step()
    return m, opt


def save(ckpt_dir: Path, it: int, seed: int = 0) -> Tiny:
    m, opt = trained(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        dcp.save_sharded(ck.checkpoint_path(ckpt_dir, it, sharded=True), m, opt,
                         {"iteration": it, "config": "{}", "rng": ck.rng_state()})
    ck.prune(ckpt_dir, it, keep_last=3)
    return m


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    src = save(tmp_path, 5, seed=1)
    path, meta = ck.newest_intact(tmp_path)
    assert path.name == "ckpt_0000005" and meta["iteration"] == 5 and meta["format"] == "dcp"
    m, opt = trained(seed=2)  # other weights, other optimizer moments
    dcp.load_sharded(path, m, opt)
    for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    moments = [s["exp_avg"] for s in opt.state.values()]
    src_opt = trained(seed=1)[1]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, src_opt.state.values(), strict=True))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "meta.pt"}
    full = dcp.read_full_model(path, ("teacher",))  # the export path: the teacher only
    assert set(full) == {"teacher"} and torch.equal(full["teacher"]["weight"], src.teacher.weight)


@pytest.mark.parametrize("damage", ["flipped byte", "missing file", "no manifest"])
def test_resume_walks_back_past_a_damaged_folder_and_keeps_it_aside(tmp_path, caplog, damage) -> None:
    for it in (1, 2, 3, 4):
        save(tmp_path, it, seed=it)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_0000002", "ckpt_0000003", "ckpt_0000004"]
    newest = tmp_path / "ckpt_0000004"
    if damage == "flipped byte":
        data = bytearray((newest / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "__0_0.distcp").write_bytes(bytes(data))
    elif damage == "missing file":
        (newest / "__0_0.distcp").unlink()
    else:  # a folder renamed by hand before its manifest existed
        (newest / "manifest.json").unlink()
    (tmp_path / ".ckpt_0000005.tmp").mkdir()  # a save that a kill interrupted
    with caplog.at_level(logging.WARNING, logger="dinolike.train"):
        path, meta = ck.newest_intact(tmp_path)
    assert path.name == "ckpt_0000003" and meta["iteration"] == 3
    assert (tmp_path / "ckpt_0000004.damaged").is_dir() and "ckpt_0000004" in caplog.text
    assert not (tmp_path / ".ckpt_0000005.tmp").exists()


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    m, opt = trained(0)
    with torch.no_grad():
        m.teacher.weight[0, 0] = float("nan")
    with pytest.raises(ck.NonFiniteStateError, match="model.teacher.weight"):
        dcp.save_sharded(tmp_path / "ckpt_0000001", m, opt, {"iteration": 1})
    assert list(tmp_path.iterdir()) == []


def test_no_intact_folder_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    save(tmp_path, 1)
    (tmp_path / "ckpt_0000001" / "meta.pt").write_bytes(b"")
    with pytest.raises(ck.DamagedCheckpointError, match="no intact checkpoint"):
        ck.newest_intact(tmp_path)


def test_distillation_and_export_read_the_teacher_of_a_dcp_folder(tmp_path: Path) -> None:
    from dinolike.training.distill import _teacher_config

    src = save(tmp_path, 5, seed=3)
    _, ckpt, path = _teacher_config(tmp_path)  # a checkpoints folder: its newest checkpoint, a DCP folder here
    assert path.name == "ckpt_0000005" and torch.equal(ckpt["model"]["teacher"]["weight"], src.teacher.weight)
    assert ck.resolve_checkpoint(path) == path
