"""The eval commands end to end: results files, cache reuse, strict loading, plot and viz PNGs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinolike.commands.eval import main as eval_main
from dinolike.commands.plot import main as plot_main
from dinolike.commands.viz import main as viz_main
from dinolike.eval.knn import knn_eval
from dinolike.eval.plot import NCOLS, PANEL_H_IN, PANEL_W_IN
from dinolike.eval.settings import eval_settings
from dinolike.eval.viz import pca_rgb

FMNIST = "/usr/share/datasets/fashion-mnist"
PICO = [
    "--config",
    "vit_pico",
    "model.patch_size=7",
    "model.img_size=28",
    "model.in_chans=1",
    "model.layerscale=1.0",
    "data.mean=[0.286]",
    "data.std=[0.353]",
    "crops.global_size=28",
]


def _fmnist_pixels(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reading of the IDX files (not through the dataset code under test)."""
    import gzip

    prefix = "train" if split == "train" else "t10k"
    with gzip.open(f"{FMNIST}/{prefix}-images-idx3-ubyte.gz") as f:
        imgs = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784].reshape(n, 784)
    with gzip.open(f"{FMNIST}/{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return torch.from_numpy(imgs.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def test_knn_pixels_on_fashion_mnist_matches_direct_computation(tmp_path, capsys) -> None:
    args = [
        "knn",
        "--pretrained",
        "pixels",
        "--limit-train",
        "2000",
        "--limit-val",
        "300",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "eval.knn.ks=[5,20]",
    ]
    assert eval_main(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    tr_x, tr_y = _fmnist_pixels("train", 2000)
    te_x, te_y = _fmnist_pixels("test", 300)
    # per-pixel normalisation is an affine map, so compute the expected features the same way
    mean, std = 0.2860, 0.3530
    ref = knn_eval((tr_x / 255 - mean) / std, tr_y, (te_x / 255 - mean) / std, te_y, eval_settings("knn", ks=(5, 20)))
    assert res["metrics"] == pytest.approx(ref)
    assert res["n_train"] == 2000 and res["n_test"] == 300 and res["feature_dim"] == 784
    assert res["metrics"]["k20_top1"] > 60.0  # pixels kNN on Fashion-MNIST is far above chance
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| k | top1 | top5 |" in md and f"{ref['k20_top1']:.2f}" in md
    assert "| 20 |" in capsys.readouterr().out
    assert res["feature_cache_hits"] == {"fmnist:train": False, "fmnist:test": False}
    # a second protocol run on the same data reuses the cached pass
    args2 = [
        "logreg",
        "--pretrained",
        "pixels",
        "--limit-train",
        "2000",
        "--limit-val",
        "300",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "lr"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "eval.logreg.cs=[0.1]",
        "eval.logreg.max_iter=100",
    ]
    assert eval_main(args2) == 0
    res2 = json.loads((tmp_path / "lr" / "results.json").read_text())
    assert res2["feature_cache_hits"] == {"fmnist:train": True, "fmnist:test": True}
    assert 50.0 < res2["metrics"]["test_top1"] <= 100.0


def test_linear_with_random_model_runs_the_grid(tmp_path) -> None:
    args = [
        "linear",
        "--pretrained",
        "random",
        *PICO,
        "--limit-train",
        "300",
        "--limit-val",
        "100",
        "--no-progress",
        "--no-cache",
        "--output-dir",
        str(tmp_path),
        "eval.linear.epochs=1",
        "eval.linear.lrs=[0.001,0.1]",
    ]
    assert eval_main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["heads"]) == 2 * 4 and res["feature_dim"] == 96 and res["resolution"] == 28
    assert res["metrics"]["best_lr"] in (0.001, 0.1)
    assert res["metrics"]["val_top1"] == max(h["val_top1"] for h in res["heads"])


def test_strict_loading_rejects_missing_key_and_names_it(tmp_path, capsys) -> None:
    from dinolike.models import build_backbone

    model = build_backbone({"arch": "vit_pico", "patch_size": 7, "img_size": 28, "in_chans": 1})
    state = model.state_dict()
    del state["blocks.2.attn.qkv.weight"]
    ckpt = tmp_path / "backbone.pth"
    torch.save(state, ckpt)
    args = [
        "knn",
        "--pretrained",
        str(ckpt),
        *PICO,
        "--limit-train",
        "50",
        "--limit-val",
        "20",
        "--no-cache",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "blocks.2.attn.qkv.weight" in err and "missing" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_override_and_missing_checkpoint_are_clear_errors(tmp_path, capsys) -> None:
    assert eval_main(["knn", "--pretrained", "pixels", "eval.knn.temprature=0.1"]) == 2
    assert "did you mean 'eval.knn.temperature'" in capsys.readouterr().err
    assert eval_main(["knn", "--pretrained", str(tmp_path / "nope.pth"), "--config", "vit_pico"]) == 2
    assert "not found" in capsys.readouterr().err
    assert eval_main(["knn", "--pretrained", "pixels", "--train-dataset", "mnist:train", "--no-cache"]) == 2
    assert "--train-dataset: unknown dataset spec 'mnist:train'" in capsys.readouterr().err  # before any work


def test_plot_writes_png_of_expected_size(tmp_path) -> None:
    keys = ["loss", "dino_local_loss", "dino_global_loss", "ibot_loss", "koleo_loss", "lr", "teacher_temp"]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for it in range(0, 200, 10):
            rec = {"iteration": it, **{k: 1.0 / (1 + it) + i for i, k in enumerate(keys)}, "skipped": 0}
            f.write(json.dumps(rec) + "\n")
            if it % 50 == 0:
                f.write(json.dumps({"iteration": it, "knn_top1": 10.0 + it / 10}) + "\n")
        f.write("{not json\n")  # a torn last line (killed run) is skipped, not fatal
    assert plot_main([str(tmp_path), "--dpi", "50"]) == 0
    png = Image.open(tmp_path / "curves.png")
    n_panels = len(keys) + 1  # + knn_top1
    rows = math.ceil(n_panels / NCOLS)
    assert png.size == (round(NCOLS * PANEL_W_IN * 50), round(rows * PANEL_H_IN * 50))
    arr = np.asarray(png.convert("L"), dtype=np.float32)
    assert arr.std() > 5.0  # something was drawn


def test_plot_without_metrics_is_an_error(tmp_path, capsys) -> None:
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_pca_foreground_mask_recovers_the_object() -> None:
    # 8x8 patch grid, a 4x4 object in the middle whose tokens differ from the background's
    g = torch.Generator().manual_seed(0)
    h = w = 8
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[2:6, 2:6] = True
    bg_vec, fg_vec = torch.randn(32, generator=g), torch.randn(32, generator=g)
    tokens = torch.where(obj.view(-1, 1), fg_vec, bg_vec) + 0.05 * torch.randn(h * w, 32, generator=g)
    tokens = torch.stack([tokens, tokens.flip(0)])  # [2, 64, 32]; the flip keeps the object centred
    rgb, fg = pca_rgb(tokens, (h, w))
    assert torch.equal(fg[0], obj) and torch.equal(fg[1], obj)
    assert rgb.shape == (2, h, w, 3) and rgb[:, ~obj].abs().max() == 0  # background is black
    assert rgb[fg].max() <= 1.0 and rgb[fg].min() >= 0.0


def test_viz_writes_grid_png_and_skips_unreadable_images(tmp_path, capsys) -> None:
    paths = []
    for i in range(3):
        arr = np.full((40, 40), 20, np.uint8)
        arr[10 + i : 30, 8 : 30 - i] = 230
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pca.png"
    rc = viz_main(
        [
            "--pretrained",
            "random",
            "--resolution",
            "28",
            "--tile",
            "64",
            "--out",
            str(out),
            *paths,
            str(bad),
            "--config",
            "vit_pico",
            *PICO[2:],  # bare key=value, as in every command
        ]
    )
    assert rc == 0
    png = Image.open(out)
    assert png.size == (3 * 64, 2 * 64)
    assert np.asarray(png).std() > 1.0
    assert "1 skipped" in capsys.readouterr().out


def test_eval_at_another_resolution_interpolates_position_embeddings(tmp_path) -> None:
    # the model's position embedding is learned for 28 px; evaluating at 42 px goes through the PIL
    # resize path and a 6x6 patch grid
    args = [
        "knn",
        "--pretrained",
        "random",
        *PICO,
        "eval.resolution=42",
        "eval.knn.ks=[3]",
        "--limit-train",
        "60",
        "--limit-val",
        "20",
        "--no-progress",
        "--no-cache",
        "--output-dir",
        str(tmp_path),
    ]
    assert eval_main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["resolution"] == 42 and res["n_train"] == 60
    assert 0.0 <= res["metrics"]["k3_top1"] <= 100.0


def test_image_folder_with_a_corrupt_file_is_a_counted_skip(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            size = (20 + 3 * i, 24)  # mixed sizes: the eval transform must resize + crop them
            arr = rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "b" / "broken.png").write_bytes(b"\x89PNG truncated")
    spec = f"folder:{tmp_path / 'data'}"
    args = [
        "knn",
        "--pretrained",
        "pixels",
        "--train-dataset",
        spec,
        "--val-dataset",
        spec,
        "eval.resolution=16",
        "eval.knn.ks=[1]",
        "eval.num_workers=0",
        "--no-progress",
        "--no-cache",
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert eval_main(args) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["skipped"] == {"train": 1, "test": 1} and res["n_train"] == 10
    assert res["feature_dim"] == 3 * 16 * 16
    assert res["metrics"]["k1_top1"] == 100.0  # every image finds itself
    # an image outside the class folders has no label: a clear error, not a crash in the protocol
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "data" / "loose.png")
    assert eval_main(args) == 2
    assert "have no label" in capsys.readouterr().err


def test_a_run_config_from_another_version_evaluates_with_a_warning(tmp_path, caplog) -> None:
    """A run's config.yaml with a key this version renamed (e.g. collapse.uniform_ratio) must not block
    its evaluation: the key is ignored and named; a misspelt key on the command line still fails."""
    from omegaconf import OmegaConf

    from dinolike.config import load_config
    from dinolike.models import build_backbone

    run = tmp_path / "run"
    run.mkdir()
    cfg = OmegaConf.to_container(load_config(None, ["model.arch=vit_pico", *(a for a in PICO if "=" in a)]))
    cfg["collapse"]["uniform_ratio"] = 0.98  # a key of an older schema
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    model = build_backbone({"arch": "vit_pico", "patch_size": 7, "img_size": 28, "in_chans": 1})
    torch.save(model.state_dict(), run / "teacher_backbone.pth")
    base = ["knn", "--pretrained", str(run / "teacher_backbone.pth"), "--limit-train", "200", "--limit-val", "50",
            "--no-cache", "--no-progress", "--output-dir", str(tmp_path / "out")]
    with caplog.at_level("WARNING"):
        assert eval_main(base) == 0
    assert "collapse.uniform_ratio" in caplog.text and "ignoring 1 key" in caplog.text
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["model"]["patch_size"] == 7 and 0 < res["metrics"]["k20_top1"] <= 100
    assert eval_main([*base, "collapse.uniform_ratio=0.9"]) == 2  # the command line stays strict


def test_knn_with_cls_plus_patch_features_and_its_errors(tmp_path, capsys) -> None:
    """eval.knn.features=cls+patches votes with CLS + pooled patch tokens (recorded in results.json); a
    misspelt kind fails before any extraction, raw pixels (no patch tokens) fail with one line."""
    base = ["--limit-train", "300", "--limit-val", "100", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    out = {}
    for kind in ("cls", "cls+patches"):
        args = ["knn", "--pretrained", "random", *PICO, *base, "--output-dir", str(tmp_path / kind),
                f"eval.knn.features={kind}", "eval.knn.ks=[20]"]
        assert eval_main(args) == 0
        out[kind] = json.loads((tmp_path / kind / "results.json").read_text())
    assert out["cls+patches"]["features"] == "cls+patches" and out["cls"]["features"] == "cls"
    assert out["cls+patches"]["feature_cache_hits"] == {"fmnist:train": True, "fmnist:test": True}
    assert 30.0 < out["cls+patches"]["metrics"]["k20_top1"] <= 100.0  # a random ViT is far above chance
    capsys.readouterr()
    assert eval_main(["knn", "--pretrained", "random", *PICO, *base, "eval.knn.features=patch"]) == 2
    err = capsys.readouterr().err
    assert "eval.knn.features='patch': one of cls | cls+patches" in err and "Traceback" not in err
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the two cached passes, nothing new
    assert eval_main(["knn", "--pretrained", "pixels", *base, "eval.knn.features=cls+patches"]) == 2
    assert "raw pixels" in capsys.readouterr().err
