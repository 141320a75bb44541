"""The shape of the code (issue 42): library functions below, command shells on top, one source of truth
for every setting. Each check reads the files (nothing is run) and names what breaks it."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SHIMS = ("eval", "curation", "launch")
CLI_LAYER = ("dinolike/cli.py", "dinolike/commands/")


def _py_files(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py") if "__pycache__" not in p.parts)


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def test_the_command_folders_live_in_the_package_and_the_top_level_ones_are_shims() -> None:
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    assert not (REPO / "dinolike" / "commands" / "packages.py").exists()
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not set(tool.get("package-dir", {})) & {"dinolike_eval", "dinolike_curation", "dinolike_launch"}
    packages = set(tool["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dinolike").rglob("__init__.py")}
    assert found <= packages, f"packages missing from pyproject.toml: {sorted(found - packages)}"
    assert not [p for p in packages if p.split(".")[0] in SHIMS], "the checkout shims must not be installed"
    long = [f"{_rel(p)}: {len(p.read_text().splitlines())}" for p in _py_files(*SHIMS)
            if len(p.read_text().splitlines()) > 15]
    assert not long, f"shims over 15 lines: {long}"
    for p in _py_files(*SHIMS):
        assert "import_command" not in p.read_text()


def test_no_command_line_crosses_a_call_between_jobs() -> None:
    """argv only at real process boundaries: no `main([...])`, no `except SystemExit`, no shlex, no
    import_command in the package outside the CLI dispatcher; argparse only in the command layer."""
    bad, argparse_users = [], []
    for p in _py_files("dinolike"):
        rel, text = _rel(p), p.read_text()
        if rel != "dinolike/cli.py":
            bad += [f"{rel}: {m.group(0)}" for m in re.finditer(r"main\(\[|except SystemExit|shlex|import_command",
                                                                 text)]
        if "argparse" in text and not rel.startswith(CLI_LAYER):
            argparse_users.append(rel)
    assert not bad, bad
    assert not argparse_users, f"argparse outside the command layer: {argparse_users}"


def test_the_package_installs_nothing_on_the_machine_and_no_file_is_too_long() -> None:
    # code that installs system packages (the test cluster's slurm / mariadb): `apt-get` as a command's word;
    # a message telling the user which package to install is no installer
    installers = [_rel(p) for p in _py_files("dinolike", *SHIMS)
                  if re.search(r"mariadb|[\"']apt-get[\"']", p.read_text())]
    assert not installers, f"the test cluster's installer belongs in tests/: {installers}"
    long = [f"{_rel(p)}: {n}" for p in _py_files("dinolike", *SHIMS, "benchmarks")
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, f"files over 400 lines: {long}"


def _eval_schema_keys() -> set[str]:
    from dinolike.eval.settings import SCHEMA

    def leaves(node, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.items():
            out |= leaves(v, f"{k}.") if hasattr(v, "items") else {f"{prefix}{k}".split(".")[-1]}
        return out

    return leaves(OmegaConf.load(SCHEMA).eval)


def test_the_eval_schema_is_the_only_source_of_every_setting() -> None:
    """No protocol function has a keyword default for a setting the eval schema holds, and every settings
    record has exactly the keys of its schema section (a default in two places drifted before: the linear
    probe's function said 4 learning rates and 10 epochs, the schema 13 and 30)."""
    from dinolike.eval import protocols
    from dinolike.eval.knn import knn_eval
    from dinolike.eval.linear import linear_probe
    from dinolike.eval.logreg import logreg_eval
    from dinolike.eval.settings import RECORDS, eval_settings, schema_section

    keys = _eval_schema_keys() - {"device"}  # where to compute is not a protocol setting...
    for fn in (knn_eval, linear_probe, logreg_eval, *protocols.PROTOCOLS.values()):
        defaulted = [n for n, p in inspect.signature(fn).parameters.items()
                     if p.default is not inspect.Parameter.empty and n in keys | {"device"}]
        assert not defaulted, f"{fn.__qualname__} defaults schema settings: {defaulted}"  # ...nor defaulted
    for name, record in RECORDS.items():
        fields = [f.name for f in record.__dataclass_fields__.values()]
        assert set(fields) == set(schema_section(name)), name
        assert all(f.default is inspect.Parameter.empty or f.default.__class__.__name__ == "_MISSING_TYPE"
                   for f in record.__dataclass_fields__.values()), f"{record.__name__} has defaults"
        assert eval_settings(name) == record.of(schema_section(name))


def test_the_schema_check_can_fail(tmp_path: Path) -> None:
    """A record whose fields differ from its schema section is refused when it is built."""
    import pytest

    from dinolike.config import ConfigError
    from dinolike.eval.settings import KnnConfig, schema_section

    section = dict(OmegaConf.to_container(schema_section("knn")))
    section["temprature"] = section.pop("temperature")
    with pytest.raises(ConfigError, match="disagree"):
        KnnConfig.of(section)


def test_command_modules_only_parse_and_call() -> None:
    """Every `dinolike` command's module has a `main(argv)`; none defines a job: no class other than its
    parser and no function over 40 lines (a job's body belongs to the library)."""
    long = []
    for p in _py_files("dinolike/commands"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno > 40:
                long.append(f"{_rel(p)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno} lines)")
    assert not long, long
