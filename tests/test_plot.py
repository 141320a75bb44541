"""`dinolike plot` pictures people read (issue 34): the run's name clear of the panels, the entropy panels
against ln K (where a collapsed run sits) with their values written out, not as an offset; and the
1-channel-recipe warning only for images that are not what the recipe was made for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from testkit import SMOKE

from dinolike.config import load_config
from dinolike.data.datasets import FashionMNIST
from dinolike.eval.plot import curves_figure
from dinolike.training.data import grey_scale_warning

K = 256  # the smoke recipe's prototypes (heads.out_dim)


def near_collapse_run(tmp: Path) -> Path:
    """A smoke run's folder whose entropies sit just below ln K (a run close to collapse): values that
    differ in the 4th decimal, which matplotlib would write as an offset above the axis."""
    run = tmp / "fmnist_smoke_long_run_name"
    run.mkdir()
    OmegaConf.save(load_config(SMOKE, [f"run.output_dir={run}"]), run / "config.yaml")
    with open(run / "metrics.jsonl", "w") as f:
        for it in range(0, 200, 10):
            f.write(json.dumps({"iteration": it, "loss": 11.0 - it / 100, "dino_global_loss": 5.5, "ibot_loss": 3.0,
                                "teacher_entropy": math.log(K) - 1e-4 * (1 + it / 200),
                                "student_mean_entropy": math.log(K) - 2e-4, "lr": 1e-3, "knn_top1": 60.0}) + "\n")
    return run


@pytest.mark.parametrize("dpi", [60, 100])
def test_title_stays_clear_of_the_panels(tmp_path: Path, dpi: int) -> None:
    fig = curves_figure(near_collapse_run(tmp_path), dpi)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(r)
    top = max(ax.get_tightbbox(r).y1 for ax in fig.axes if ax.axison)  # panel titles included
    assert title.y0 - top >= 0.3 * title.height  # a visible gap, not touching the top panels' titles


def test_entropy_panels_show_ln_k_and_no_offset(tmp_path: Path) -> None:
    fig = curves_figure(near_collapse_run(tmp_path))
    fig.canvas.draw()
    panels = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    for key in ("teacher_entropy", "student_mean_entropy"):
        ax = panels[key]
        ref = [line for line in ax.get_lines() if line.get_label().startswith("ln K")]
        assert len(ref) == 1 and list(ref[0].get_ydata()) == pytest.approx([math.log(K)] * 2)
        assert ax.yaxis.get_major_formatter().get_offset() == ""
    ticks = [t.get_text() for t in panels["teacher_entropy"].get_yticklabels()]
    assert ticks and all(t.startswith("5.54") for t in ticks)  # the values themselves, not "+5.545" and 1e-5s
    assert all(ax.yaxis.get_major_formatter().get_offset() == "" for ax in panels.values())


def _save(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_grey_scale_warning_only_for_photos(tmp_path: Path) -> None:
    """Fashion-MNIST PNGs listed in a manifest (what curation writes) are what the 1-channel recipes are
    for; RGB photos, or grey images larger than the crop, get the warning."""
    ds = FashionMNIST(split="test", limit=3)
    pngs = [_save(tmp_path / "fm" / f"{i}.png", ds[i][0]) for i in range(3)]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in pngs))
    for spec in (f"manifest:{tmp_path / 'list.txt'}", f"folder-nolabels:{tmp_path / 'fm'}", "fmnist:train"):
        assert grey_scale_warning(load_config(SMOKE, [f"data.train={spec}"])) is None, spec
    photo = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    _save(tmp_path / "photos" / "a.jpg", Image.fromarray(photo))
    _save(tmp_path / "big" / "a.png", ds[0][0].resize((224, 224)))
    for folder, what in (("photos", "64x64 RGB"), ("big", "224x224 L")):
        msg = grey_scale_warning(load_config(SMOKE, [f"data.train=folder-nolabels:{tmp_path / folder}"]))
        assert msg is not None and what in msg and "folder_vits14.yaml" in msg
