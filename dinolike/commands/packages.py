"""How commands reach the command packages `eval/`, `curation/` and `launch/`, installed or not.

The folders keep their short names in the repository (`python -m eval.knn` from the repository root),
but they are installed as `dinolike_eval`, `dinolike_curation` and `dinolike_launch` (pyproject.toml):
a generic top-level `eval` or `launch` would collide with another distribution's package of that name,
or be shadowed by one earlier on sys.path. Commands that call another command package therefore never
import it by its folder name: `import_command("eval.knn")` returns `dinolike_eval.knn`, taken from the
source tree this `dinolike` package belongs to (a checkout, installed editable or not), else from the
installed distribution.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

COMMAND_PACKAGES = ("eval", "curation", "launch")
INSTALLED_PREFIX = "dinolike_"


def installed_name(folder: str) -> str:
    """`eval` -> `dinolike_eval`: the name a command folder is installed (and imported) under."""
    if folder not in COMMAND_PACKAGES:
        raise ValueError(f"{folder!r} is not a command package ({', '.join(COMMAND_PACKAGES)})")
    return INSTALLED_PREFIX + folder


def _source_folder(folder: str) -> Path | None:
    """The command folder next to this `dinolike` package when that is a source tree (has pyproject.toml);
    None in an installed wheel, where a sibling `eval/` would be another distribution's package."""
    root = Path(__file__).resolve().parents[2]
    path = root / folder
    return path if (root / "pyproject.toml").is_file() and (path / "__init__.py").is_file() else None


def _load_package(name: str, path: Path) -> ModuleType:
    """Import the package folder `path` under `name` (its modules import each other relatively)."""
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_command(dotted: str) -> ModuleType:
    """`eval.knn` -> the module `dinolike_eval.knn`, whether the package is installed or in a checkout."""
    folder, _, rest = dotted.partition(".")
    name = installed_name(folder)
    if name not in sys.modules and (source := _source_folder(folder)) is not None:
        _load_package(name, source)
    return importlib.import_module(f"{name}.{rest}" if rest else name)
