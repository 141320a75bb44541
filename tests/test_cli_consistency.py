"""One consistent CLI (issue 17), through the real entry point: `--version`, unknown commands, help that
names the command typed and lists every dataset spec, no faiss loader noise, one error prefix
(`dinolike <command>: error: ...`), help text on every option, and viz taking bare key=value overrides."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def dinolike(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}  # help lines unwrapped
    return subprocess.run([sys.executable, "-m", "dinolike.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_version_and_unknown_command() -> None:
    r = dinolike("--version")
    assert r.returncode == 0 and r.stdout.startswith("dinolike ")
    r = dinolike("frobnicate")
    assert r.returncode == 2
    assert "dinolike: error: unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["eval", "--help"], "usage: dinolike eval"),
        (["eval", "knn", "--help"], "usage: dinolike eval knn"),
        (["submit", "--help"], "usage: dinolike submit"),
        (["curate", "--help"], "usage: dinolike curate"),
    ],
)
def test_help_names_the_command_typed(args: list[str], usage: str) -> None:
    r = dinolike(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(usage)
    assert "faiss" not in r.stdout + r.stderr  # no loader noise
    if args[:2] == ["eval", "knn"]:
        assert "folder-nolabels" in r.stdout and "manifest" in r.stdout


def test_errors_share_one_prefix(tmp_path: Path) -> None:
    cases = [
        (["train", "--config", "configs/fmnist_smoke.yaml", "optim.bogus=1"], "dinolike train: error: "),
        (["eval", "knn", "--pretrained", str(tmp_path / "nope.pth"), "--config", "vit_pico"],
         "dinolike eval knn: error: "),
        (["eval", "nope"], "dinolike eval: error: "),
        (["plot", str(tmp_path)], "dinolike plot: error: "),
        (["export", str(tmp_path / "nope.pth"), "--format", "hf", "--out", str(tmp_path / "o")],
         "dinolike export: error: "),
    ]
    for args, prefix in cases:
        r = dinolike(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert prefix in r.stderr, (args, r.stderr)


def test_every_option_has_help() -> None:
    from dinolike.commands.bench import build_parser as bench
    from dinolike.commands.curate import build_parser as curate
    from dinolike.commands.eval import build_parser as protocol
    from dinolike.commands.export import build_parser as export
    from dinolike.commands.plot import build_parser as plot
    from dinolike.commands.submit import build_parser as submit
    from dinolike.commands.train import build_parser as train
    from dinolike.commands.viz import build_parser as viz

    parsers = [train("train"), train("distill"), bench(), export(), protocol("knn"), protocol("linear"),
               protocol("logreg"), plot(), viz(),
               curate(), submit()]
    for p in parsers:
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help text"


def test_viz_takes_bare_overrides_and_defaults_to_the_trained_resolution(tmp_path: Path) -> None:
    img = tmp_path / "shirt.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(img)
    pico = ["model.patch_size=7", "model.img_size=28", "model.in_chans=1", "model.depth=1",
            "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]", "crops.global_size=28"]
    out = tmp_path / "pca.png"
    r = dinolike("viz", "--pretrained", "random", "--config", "vit_pico", "--tile", "64", "--out", str(out),
                 "--device", "cpu", str(img), *pico)
    assert r.returncode == 0, r.stderr
    assert "at 28 px" in r.stdout  # the model's training size, not 224
    assert Image.open(out).size == (64, 128)
    r = dinolike("viz", "--pretrained", "random", "--config", "vit_pico", "--out", str(out), "--device", "cpu",
                 str(img), "--opts", *pico)
    assert r.returncode == 0 and "deprecated" in r.stderr


def test_no_command_is_help_and_a_typo_gets_a_suggestion() -> None:
    r = dinolike()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: dinolike COMMAND") and "embed" in r.stderr and "give a command" in r.stderr
    r = dinolike("trian")
    assert r.returncode == 2 and "unknown command 'trian'; did you mean 'train'?" in r.stderr
    r = dinolike("eval", "kn")
    assert r.returncode == 2 and "unknown protocol 'kn'; did you mean 'knn'?" in r.stderr


def test_eval_help_lists_the_protocols_only() -> None:
    r = dinolike("eval", "--help")
    protocols = r.stdout.split("protocols:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in protocols] == ["knn", "linear", "logreg"]
    assert "dinolike plot, dinolike viz" in r.stdout  # named as the commands they are


def test_a_run_folder_is_a_checkpoint_for_eval_and_viz(tmp_path: Path) -> None:
    """`--pretrained runs/x`: its teacher_backbone.pth and its config (preprocessing); results said where."""
    from test_export_downstream import fake_run

    run = fake_run(tmp_path)
    r = dinolike("eval", "knn", "--pretrained", str(run), "--limit-train", "300", "--limit-val", "100",
                 "--no-cache", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "results written to outputs/eval/knn/results.json (and results.md)" in r.stderr
    res = json.loads((tmp_path / "outputs" / "eval" / "knn" / "results.json").read_text())
    assert res["resolution"] == 28 and res["feature_dim"] == 96  # the run's own crop and model
    assert res["model"]["arch"] == "vit_pico"
    img = tmp_path / "shirt.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(img)
    r = dinolike("viz", "--pretrained", str(run), "--tile", "56", "--out", str(tmp_path / "pca.png"), str(img))
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'pca.png'} (1 images at 28 px" in r.stdout


def test_eval_reads_a_shipped_recipe_by_name_from_another_folder(tmp_path: Path) -> None:
    r = dinolike("eval", "knn", "--pretrained", "random", "--config", "fmnist_smoke.yaml", "--limit-train", "200",
                 "--limit-val", "100", "--no-cache", "--no-progress", "--output-dir", "knn", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["model"]["arch"] == "vit_pico"
    r = dinolike("eval", "knn", "--pretrained", "random", "--config", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "config file not found: nope.yaml (looked in" in r.stderr
