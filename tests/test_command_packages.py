"""The command folders `eval/`, `curation/`, `launch/` are installed as `dinolike_eval`, ... and reached by
that name, so another distribution's `eval` or `launch` package can neither be overwritten by ours nor
take their place (pyproject.toml, dinolike/commands/packages.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from testkit import REPO

from dinolike.commands.packages import COMMAND_PACKAGES, import_command, installed_name

# every command of the dispatcher that lives in a command package, by its --help
HELP_RUN = """
import sys
from dinolike.cli import main
for argv in (["eval", "knn", "--help"], ["plot", "--help"], ["viz", "--help"], ["submit", "--help"],
             ["curate", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
    print("ok", argv[0])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("eval", "launch", "curation")))
"""


def test_the_cli_ignores_other_packages_named_eval_launch_or_curation(tmp_path: Path) -> None:
    other = tmp_path / "other-site-packages"
    for name in COMMAND_PACKAGES:
        (other / name).mkdir(parents=True)
        (other / name / "__init__.py").write_text(f"raise ImportError('the other distribution\\'s {name}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(other), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", HELP_RUN], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("ok")] == [
        "ok eval", "ok plot", "ok viz", "ok submit", "ok curate"]
    assert out.stdout.splitlines()[-1] == "[]"  # no module was imported by its generic name


def test_import_command_finds_this_checkouts_folders() -> None:
    """Installed editable: `dinolike_eval`; a checkout on sys.path that is not installed: `eval` (what a
    SLURM node unpickling a job finds the same way); either way the folder of this repository."""
    knn = import_command("eval.knn")
    assert knn.__name__ in ("dinolike_eval.knn", "eval.knn") and callable(knn.main)
    assert Path(knn.__file__).resolve() == REPO / "eval" / "knn.py"
    submit = import_command("launch.submit")
    assert Path(submit.__file__).resolve() == REPO / "launch" / "submit.py"
    with pytest.raises(ValueError, match="not a command package"):
        import_command("benchmarks.bench_eval")


def test_pyproject_installs_the_folders_under_their_dinolike_names() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {**{installed_name(f): f for f in COMMAND_PACKAGES}, "dinolike.configs": "configs"}
    library = sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dinolike").rglob("__init__.py"))
    # every folder of configs/ ships as package data (dinolike.configs.*) with its recipes
    configs = sorted(".".join(("dinolike", *d.relative_to(REPO).parts)) for d in (REPO / "configs").rglob("*")
                     if d.is_dir()) + ["dinolike.configs"]
    assert sorted(tool["packages"]) == sorted([*library, *(installed_name(f) for f in COMMAND_PACKAGES), *configs])
    assert all(tool["package-data"][c] == ["*.yaml"] for c in configs)
    assert not set(tool["packages"]) & set(COMMAND_PACKAGES)  # no top-level eval / launch / curation
