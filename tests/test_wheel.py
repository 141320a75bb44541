"""The wheel a user installs (issue 34): `pip wheel .`, installed into a fresh virtual environment, runs the
shipped recipes by name from a folder that is not the repository: `dinolike train --config
fmnist_smoke.yaml`, `dinolike eval knn` on the run folder (the eval schema ships too), and `dinolike pipeline`
whose stage recipes are named `configs/...` (resolved from the installed package, not the current folder).

The fresh environment gets the wheel only; torch and the other dependencies are made visible from this
test's own environment by a .pth file (reinstalling torch would take minutes and a network).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

SOURCES = ("pyproject.toml", "README.md", "dinolike", "eval", "curation", "launch", "configs")


def run(cmd: list[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from a copy of the sources (the checkout stays clean)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
        cwd=root)
    wheel = next((root / "dist").glob("dinolike-*.whl"))
    env = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env], cwd=root)
    run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "--no-deps", "-q", wheel],
        cwd=root)
    purelib = next((env / "lib").glob("python3*/site-packages"))
    (purelib / "_dependencies.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    return env


def test_wheel_runs_the_shipped_recipes_from_any_folder(venv: Path, tmp_path: Path) -> None:
    bin_ = venv / "bin"
    where = run([bin_ / "python", "-c", "import dinolike, dinolike.config as c; print(dinolike.__file__, c.BASE)"],
                cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not the checkout's
    assert Path(where[1]).is_file()

    run([bin_ / "dinolike", "train", "--config", "fmnist_smoke.yaml", "run.output_dir=run"], cwd=tmp_path)
    assert (tmp_path / "run" / "teacher_backbone.pth").is_file()

    r = run([bin_ / "dinolike", "eval", "knn", "--pretrained", "run", "--limit-train", "500", "--limit-val", "200",
             "--no-progress", "--no-cache", "--output-dir", "knn"], cwd=tmp_path)
    assert (tmp_path / "knn" / "results.json").is_file() and "results written to knn" in r.stderr

    r = run([bin_ / "dinolike", "pipeline", "--config", "pipeline/fmnist_smoke.yaml", "output_dir=pipe",
             "stages=[pretrain]"], cwd=tmp_path)
    assert (tmp_path / "pipe" / "pretrain" / "teacher_backbone.pth").is_file()
    assert "report" in r.stderr
