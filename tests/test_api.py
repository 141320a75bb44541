"""The Python API (issue 34): the README's example runs as written in a fresh process, its plain-PyTorch
snippet (with the run's preprocessing) gives the embedding `dinolike.load` and `dinolike.embed` give, bad
input raises one clear exception, and `import dinolike` stays cheap."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import REPO, unreadable_folder

import dinolike
from dinolike.config import ConfigError
from dinolike.data.datasets import FashionMNIST


def readme_block(heading: str, start: str, stop: str | None = None) -> str:
    """The python code block under README section `heading` that starts with line `start` (up to `stop`)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        if block.startswith(start):
            return block if stop is None else block[: block.index(stop)]
    raise AssertionError(f"no python block starting with {start!r} under {heading!r}")


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's API example, run as written from an empty folder: (that folder, what it printed)."""
    cwd = tmp_path_factory.mktemp("api")
    r = python(readme_block("## Python API", "import dinolike"), cwd)
    return cwd, r.stdout


def test_readme_api_example_trains_loads_and_embeds(api_run: tuple[Path, str]) -> None:
    cwd, out = api_run
    run = cwd / "runs" / "api_demo"
    assert (run / "teacher_backbone.pth").is_file() and (run / "checkpoints").is_dir()
    assert f"{run} {run / 'teacher_backbone.pth'}" in out
    assert "torch.Size([1, 96])" in out
    assert "(10000, 96) (10000, 96) ['test/00000', 'test/00001']" in out
    # the embedding of an image is what the loaded backbone gives for it, preprocessed as its run was
    model, preprocess = dinolike.load(run)
    assert not model.training and preprocess.numbers.crop == 28 and preprocess.numbers.mean == (0.286,)
    emb = dinolike.embed(model, "fmnist:test", preprocess, batch_size=500)
    test = FashionMNIST(split="test", limit=3)
    with torch.no_grad():
        direct = model(torch.stack([preprocess(test[i][0]) for i in range(3)]))  # [3, 96]
    np.testing.assert_allclose(emb.cls[:3], direct.numpy(), atol=1e-5)
    assert emb.patches is None and emb.labels[:3].tolist() == test.labels[:3].tolist()


def test_readme_plain_pytorch_snippet_gives_the_same_embedding(api_run: tuple[Path, str], tmp_path: Path) -> None:
    """The snippet, pointed at the API run and a Fashion-MNIST image (grey: the run's model has 1 channel)."""
    run = api_run[0] / "runs" / "api_demo"
    img, _ = FashionMNIST(split="test", limit=1)[0]
    img.resize((40, 40)).save(tmp_path / "img.png")  # larger than the crop: the resize must happen
    code = readme_block("## Your own images", "# plain PyTorch (dinolike)", "# timm:")
    code = code.replace("runs/folder_vits14", str(run)).replace('"img.jpg"', repr(str(tmp_path / "img.png")))
    code = code.replace('.convert("RGB")', '.convert("L")')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own snippet
    model, preprocess = dinolike.load(run)
    with torch.no_grad():
        direct = model(preprocess(Image.open(tmp_path / "img.png"))[None])
    assert scope["cls"].shape == (1, 96)
    torch.testing.assert_close(scope["cls"].detach(), direct, atol=1e-5, rtol=0)


def test_bad_input_raises_one_clear_exception(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: unknown dataset spec 'mnist:train'"):
        dinolike.train(tmp_path / "a", data="mnist:train", recipe="fmnist_smoke.yaml")
    with pytest.raises(ConfigError, match="did you mean 'optim.epochs'"):
        dinolike.train(tmp_path / "a", recipe="fmnist_smoke.yaml", optim={"epocs": 1})
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        dinolike.train(tmp_path / "a", recipe="nope.yaml")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        dinolike.load(tmp_path / "nope")
    assert not (tmp_path / "a").exists()  # nothing ran


def test_a_failed_run_raises_train_error(tmp_path: Path) -> None:
    """Worker processes (dist.local_processes) that fail on unreadable data: TrainError, not a status."""
    from dinolike.commands.api import TrainError

    bad = unreadable_folder(tmp_path / "bad")
    with pytest.raises(TrainError, match="exit status 2"):
        dinolike.train(tmp_path / "run", data=bad, recipe="fmnist_smoke.yaml", dist={"local_processes": 2})


def test_import_dinolike_stays_cheap() -> None:
    r = python("import sys, dinolike; print(sorted(m for m in sys.modules if m.startswith(('torch', 'dinolike'))))",
               REPO)
    assert r.stdout.strip() == "['dinolike']"


def test_the_api_functions_are_plain_functions_with_their_signatures() -> None:
    """`dinolike.train` is the API function, not a package: help(), inspect and type checkers see it."""
    import inspect

    import dinolike.training.loop  # the training library under its own name, loaded first on purpose

    assert inspect.isfunction(dinolike.train) and dinolike.train.__module__ == "dinolike.commands.api"
    assert list(inspect.signature(dinolike.train).parameters)[:3] == ["out_dir", "data", "recipe"]
    assert inspect.isfunction(dinolike.load) and inspect.isfunction(dinolike.embed)
    assert dinolike.training.loop.train is not dinolike.train
