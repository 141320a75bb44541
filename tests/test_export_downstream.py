"""Exports loaded the way their users load them (issue 17): `AutoImageProcessor` + `Dinov2Model` for the
Hugging Face folder, `timm.create_model('local-dir:...')` + `resolve_data_config` for timm; each must
carry the run's own mean/std and crop size, a model card, and files readable by others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinolike.config import load_config
from dinolike.models import build_backbone
from dinolike.training.export import export_backbone

REPO = Path(__file__).resolve().parent.parent


def fake_run(tmp_path: Path, *overrides: str) -> Path:
    """A run folder as `dinolike train` leaves it (config.yaml, metrics.jsonl with a periodic kNN,
    teacher_backbone.pth + sidecar) for the 28 px grey-scale smoke recipe, without the minutes of training."""
    cfg = load_config(REPO / "configs" / "fmnist_smoke.yaml", [f"run.output_dir={tmp_path / 'run'}", *overrides])
    run = Path(cfg.run.output_dir)
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 10, "loss": 5.0, "knn_top1": 61.25}) + "\n")
    torch.manual_seed(0)
    export_backbone(build_backbone(cfg.model, drop_path=False), cfg.model, run / "teacher_backbone.pth")
    return run


def export(run: Path, fmt: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "dinolike.cli", "export", str(run), "--format", fmt, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == fmt
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    card = (out / "README.md").read_text()
    assert "fmnist:train" in card and "61.25" in card and "[0.286]" in card


def test_hf_export_loads_with_auto_image_processor(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    out = tmp_path / "hf"
    export(fake_run(tmp_path), "hf", out)
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    assert list(proc.image_mean) == pytest.approx([0.286]) and list(proc.image_std) == pytest.approx([0.353])
    model = transformers.Dinov2Model.from_pretrained(out).eval()
    img = Image.fromarray((np.random.default_rng(0).random((40, 31)) * 255).astype(np.uint8), mode="L")
    x = proc(images=img, return_tensors="pt")["pixel_values"]
    assert tuple(x.shape) == (1, 1, 28, 28)  # the run's crop, one channel: no upsampling, no RGB
    with torch.no_grad():
        assert model(pixel_values=x).pooler_output.shape == (1, 96)


def test_timm_export_reports_the_runs_preprocessing(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")

    out = tmp_path / "timm"
    export(fake_run(tmp_path), "timm", out)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 28, 28)
    assert list(data["mean"]) == pytest.approx([0.286]) and list(data["std"]) == pytest.approx([0.353])
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 96)


def test_exports_of_a_run_evaluated_below_its_learned_size_compute_what_the_model_computes(tmp_path: Path) -> None:
    """The main job learns its position grid at 28 px (4 x 4) and trains and evaluates at 21 px (3 x 3): the
    timm export used to refuse 21 px inputs (a ViT built for 28 px), and both libraries would resize the grid
    their own way. The exports store the 21 px grid as the model computes it: the same CLS embedding."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from dinolike.interop import load_pretrained

    run = fake_run(tmp_path, "crops.global_size=21")
    ours, _ = load_pretrained(run / "teacher_backbone.pth")
    x = torch.randn(3, 1, 21, 21, generator=torch.Generator().manual_seed(0))
    export(run, "timm", tmp_path / "timm")
    export(run, "hf", tmp_path / "hf")
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (1, 21, 21)
    hf_model = transformers.Dinov2Model.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = ours.eval()(x)  # [3, 96]
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf_model(pixel_values=x).pooler_output, want, rtol=0, atol=1e-5)


def test_timm_name_is_the_real_architecture(tmp_path: Path) -> None:
    """A 96-d, 2-block ViT with 7 px patches is not `vit_small_patch14_dinov2`: the entry that builds it is
    tagged with what it is; a model of an official DINOv2 shape keeps the official name."""
    timm = pytest.importorskip("timm")
    from dinolike.interop.timm import timm_model_name

    out = tmp_path / "timm"
    export(fake_run(tmp_path), "timm", out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "vit_small_patch14_dinov2.dinolike_96d_2x3h_patch7_28px"
    assert timm.create_model(f"local-dir:{out}", pretrained=True).patch_embed.proj.kernel_size == (7, 7)
    vits14 = {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 14, "img_size": 518}
    assert timm_model_name(vits14) == "vit_small_patch14_dinov2"
    assert timm_model_name({**vits14, "n_registers": 4}) == "vit_small_patch14_reg4_dinov2"
    assert timm_model_name({**vits14, "patch_size": 8}) == "vit_small_patch14_dinov2.dinolike_384d_12x6h_patch8_518px"


@pytest.mark.parametrize("fmt", ["official", "hf", "timm"])
def test_export_carries_no_local_data_path(tmp_path: Path, fmt: str) -> None:
    """A run trained on a folder of the user's images: no file of the export names that folder or the
    checkpoint's path (a model card is shared; the machine's paths are nobody else's business)."""
    run = fake_run(tmp_path)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data.train = f"folder-nolabels:{tmp_path / 'private' / 'photos'}"
    OmegaConf.save(cfg, run / "config.yaml")
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "dinolike.cli", "export", str(run / "teacher_backbone.pth"),
                        "--format", fmt, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert "`folder-nolabels`: a folder of images" in card
    assert "Exported from `teacher_backbone.pth` of run `run`" in card
    for f in out.iterdir():
        if f.suffix in (".md", ".json"):
            assert str(tmp_path) not in f.read_text(), f.name
