"""`crops.low_res_global_size`: the first `crops.low_res_epochs` of a run with smaller global crops, then the
configured size. The same images in the same order as a run without it, the size switching at the right
iteration, resumes on either side of the switch, and clear errors for sizes the model cannot take."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from testkit import SMOKE, rows

from dinolike import dist
from dinolike.config import ConfigError, load_config
from dinolike.training.data import TrainBatches
from dinolike.training.loop import train
from dinolike.training.schedules import low_res_iterations
from dinolike.training.validate import check_train_config

LOW = ["crops.low_res_global_size=21", "crops.full_size_epochs=1.5"]  # smoke: 20 iterations -> 5 at 21 px


def _stream(overrides: list[str], start: int, n: int) -> list[dict]:
    cfg = load_config(SMOKE, ["data.batch_size=4", *overrides])
    return list(itertools.islice(TrainBatches(cfg, dist.DistEnv(), start, 4), n))


def test_global_crops_switch_size_at_the_set_iteration_over_the_same_images() -> None:
    cfg = load_config(SMOKE, LOW)
    assert low_res_iterations(cfg) == 5
    plain = _stream([], 0, 8)
    low = _stream(LOW, 0, 8)
    sizes = [b["global_crops"].shape[-1] for b in low]
    assert sizes == [21] * 5 + [28] * 3
    assert [b["global_crops"].shape[-1] for b in plain] == [28] * 8
    # the same images, the same local crops and the iBOT masks on the smaller grid until the switch
    for a, b in zip(plain, low, strict=True):
        assert a["positions"].tolist() == b["positions"].tolist()
        assert b["local_crops"].shape == a["local_crops"].shape
    assert low[0]["masks"].shape[-1] == 9 and low[-1]["masks"].shape[-1] == 16  # 3 x 3 then 4 x 4 patches


def test_a_run_no_longer_than_its_full_size_epochs_runs_at_full_size() -> None:
    assert low_res_iterations(load_config(SMOKE, ["crops.low_res_global_size=21", "crops.full_size_epochs=2"])) == 0
    assert low_res_iterations(load_config(SMOKE, ["crops.low_res_global_size=21", "crops.full_size_epochs=5"])) == 0
    assert low_res_iterations(load_config(SMOKE, ["crops.full_size_epochs=0"])) == 0  # no low-res size: off
    assert low_res_iterations(load_config(SMOKE, ["crops.low_res_global_size=21", "crops.full_size_epochs=0"])) == 20


@pytest.mark.parametrize("start", [3, 5, 6])
def test_a_resumed_stream_equals_the_uninterrupted_one(start: int) -> None:
    whole = _stream(LOW, 0, 9)
    resumed = _stream(LOW, start, 9 - start)
    for a, b in zip(whole[start:], resumed, strict=True):
        assert a["positions"].tolist() == b["positions"].tolist()
        assert a["global_crops"].shape == b["global_crops"].shape


@pytest.mark.parametrize(("overrides", "match"), [
    (["crops.low_res_global_size=20"], "multiple of model.patch_size"),
    (["crops.low_res_global_size=28"], "below crops.global_size"),
    (["crops.full_size_epochs=-1"], "must be >= 0"),
])
def test_sizes_the_model_cannot_take_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_train_config(load_config(SMOKE, overrides))


def test_a_run_trains_at_both_sizes_and_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    knn = ["eval.knn_every=5", "eval.knn_train=fmnist:train", "eval.knn_val=fmnist:test", "eval.knn_limit=64"]
    assert train(load_config(SMOKE, [f"run.output_dir={out}", *LOW, "run.log_every=1", *knn])) == 0
    said = (out / "log.txt").read_text()
    assert "21 px global to iteration 5, then 28 px" in said
    r = rows(out)
    assert [x["iteration"] for x in r] == list(range(1, 21))
    # periodic kNN at the size the model trains at then: 21 px up to the switch, 28 px (the default) after
    assert [(x["iteration"], x.get("eval_px")) for x in r if "knn_top1" in x] == [(5, 21), (10, None), (15, None),
                                                                                  (20, None)]
    assert "kNN" in said and "% at 21 px" in said
    assert all(x["loss"] == x["loss"] for x in r)  # finite: no NaN from the smaller grid
    assert (out / "teacher_backbone.pth").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 20
