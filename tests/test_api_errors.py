"""Issue 45, item 8: the Python API raises documented exceptions of one family (`dinolike.DinolikeError`),
says on the terminal what the command says, and names a missing folder or a recipe without `.yaml`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_faults_run import TINY, one_line_error
from testkit import unreadable_folder

import dinolike
from dinolike.commands import export as export_cmd
from dinolike.config import find_config

SMALL = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY) if k != "collapse.enabled"}  # 9 iterations


def test_a_constant_run_warns_on_the_terminal_and_raises_train_error(tmp_path: Path, capfd) -> None:
    out = tmp_path / "run"
    with pytest.raises(dinolike.TrainError, match="CollapseError: training ended at iteration 9 with constant") as e:
        dinolike.train(out, recipe="fmnist_smoke.yaml", model={"layerscale": 1e-5}, optim={"epochs": 0.9}, **SMALL)
    assert isinstance(e.value, dinolike.DinolikeError) and e.value.status == 1
    assert isinstance(e.value.__cause__, dinolike.DinolikeError)  # the CollapseError, chained
    # no logging set up by the caller: the warning still reaches the terminal (it used to reach log.txt only)
    assert "iteration 1: constant embeddings" in capfd.readouterr().err
    # its backbone: the API embed refuses it, the export refuses it without leaving an empty --out folder
    with pytest.raises(dinolike.CollapsedBackboneError, match="refusing to embed"):
        dinolike.embed(out, "fmnist:test")
    assert export_cmd.main([str(out), "--format", "hf", "--out", str(tmp_path / "exp")]) == 2
    assert "refusing to export" in one_line_error(capfd.readouterr().err)
    assert not (tmp_path / "exp").exists()


def test_missing_data_is_a_config_error_naming_it(tmp_path: Path) -> None:
    for data, said in (("folder:/no/such", "folder not found: /no/such"),
                       ("/no/such/folder", "folder or file not found: /no/such/folder")):
        with pytest.raises(dinolike.ConfigError, match=said) as e:
            dinolike.train(tmp_path / "a", data=data, recipe="fmnist_smoke.yaml")
        assert "unknown dataset spec" not in str(e.value)
    with pytest.raises(dinolike.NotFoundError, match="folder or file not found"):
        dinolike.embed(tmp_path / "no_run", "/no/such/folder")
    assert not (tmp_path / "a").exists()  # nothing ran


def test_an_unreadable_folder_raises_train_error_in_one_process(tmp_path: Path) -> None:
    bad = unreadable_folder(tmp_path / "bad")
    with pytest.raises(dinolike.TrainError, match="DataError") as e:
        dinolike.train(tmp_path / "run", data=bad, recipe="fmnist_smoke.yaml")
    assert isinstance(e.value.__cause__, dinolike.DataError)


def test_every_documented_error_is_one_family_listed_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    api = readme[readme.index("## Python API"):readme.index("## Commands")]
    for name in ("ConfigError", "NotFoundError", "CheckpointMismatchError", "DataError", "CollapsedBackboneError",
                 "TrainError"):
        assert issubclass(getattr(dinolike, name), dinolike.DinolikeError), name
        assert f"`{name}`" in api, name
    assert "`DinolikeError`" in api
    with pytest.raises(dinolike.NotFoundError):  # still a FileNotFoundError for older callers
        dinolike.load("/no/such/run")
    assert issubclass(dinolike.NotFoundError, FileNotFoundError) and issubclass(dinolike.ConfigError, ValueError)


def test_a_recipe_named_without_yaml_is_found_or_hinted() -> None:
    assert find_config("fmnist_smoke").name == "fmnist_smoke.yaml"
    with pytest.raises(dinolike.ConfigError, match="did you mean fmnist_smoke.yaml"):
        find_config("fmnist_smok")
