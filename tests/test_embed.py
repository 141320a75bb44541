"""`dinolike embed` (issue 34) on a folder of Fashion-MNIST PNGs: one row per readable image with its file
name, the embedding the backbone gives the image preprocessed as its run was, .npy and .parquet files that
agree, and one-line errors (exit 2) for what a user gets wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export_downstream import fake_run

import dinolike
from dinolike.cli import main
from dinolike.data.datasets import FashionMNIST


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 test images in two class folders (the second at 40 px: the run's resize applies) + one broken file."""
    root = tmp_path_factory.mktemp("images")
    ds = FashionMNIST(split="test", limit=12)
    for i in range(12):
        d = root / ("bag" if i % 2 else "shirt")
        d.mkdir(exist_ok=True)
        img, _ = ds[i]
        (img.resize((40, 40)) if i % 2 else img).save(d / f"img_{i:02d}.png")
    (root / "shirt" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("run"))


def test_embed_writes_npy_with_names_and_the_runs_preprocessing(run: Path, images: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "emb.npy"
    assert main(["embed", str(run), "--data", f"folder:{images}", "--out", str(out), "--patches", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"12 images x 96 dims written to {out}" in err and "1 unreadable skipped (e.g. shirt/broken.png)" in err
    names = (tmp_path / "out" / "emb.names.txt").read_text().splitlines()
    assert names == sorted(str(p.relative_to(images)) for p in images.rglob("img_*.png"))
    cls, patches = np.load(out), np.load(tmp_path / "out" / "emb.patches.npy")
    assert cls.shape == patches.shape == (12, 96) and cls.dtype == np.float32
    model, preprocess = dinolike.load(run)
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(images / n)) for n in names])  # [12, 1, 28, 28]
        direct = model(x)
    np.testing.assert_allclose(cls, direct.numpy(), atol=1e-5)
    assert not np.allclose(cls, patches)


def test_embed_parquet_holds_the_same_rows(run: Path, images: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "e.npy"
    assert main(["embed", str(run), "--data", f"folder:{images}", "--out", str(out), "--no-progress"]) == 0
    assert not (tmp_path / "e.patches.npy").exists()  # only with --patches
    assert main(["embed", str(run), "--data", str(images), "--out", str(tmp_path / "e.parquet"), "--patches",
                 "--batch-size", "5", "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["name", "label", "cls", "patches"]
    assert table["name"].to_pylist() == (tmp_path / "e.names.txt").read_text().splitlines()
    assert table["label"].to_pylist() == [0] * 6 + [1] * 6  # bag, shirt: first-level sub-folders
    np.testing.assert_allclose(np.array(table["cls"].to_pylist()), np.load(tmp_path / "e.npy"), atol=1e-6)
    assert b"resize" in table.schema.metadata[b"dinolike"]


def test_embed_bad_input_is_one_line_exit_2(run: Path, images: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    cases = {
        (str(run), f"folder:{images}", str(tmp_path / "e.csv")): "unknown suffix '.csv'; use .npy or .parquet",
        (str(run), f"folder:{tmp_path / 'empty'}", str(tmp_path / "e.npy")): "no image files",
        (str(tmp_path / "nope"), f"folder:{images}", str(tmp_path / "e.npy")): "checkpoint not found",
        (str(run), "mnist:test", str(tmp_path / "e.npy")): "--data: unknown dataset spec 'mnist:test'",
    }
    for (ckpt, data, out), message in cases.items():
        assert main(["embed", ckpt, "--data", data, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dinolike embed: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e.npy").exists()
