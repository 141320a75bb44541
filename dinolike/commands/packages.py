"""How commands reach the command packages `eval/`, `curation/` and `launch/`, installed or not.

The folders keep their short names in the repository (`python -m eval.knn` from the repository root),
but they are installed as `dinolike_eval`, `dinolike_curation` and `dinolike_launch` (pyproject.toml):
a generic top-level `eval` or `launch` would collide with another distribution's package of that name,
or be shadowed by one earlier on sys.path. So a command that calls another command package asks for it
here, `import_command("eval.knn")`, and gets the folder that belongs to this `dinolike`, under:
- `dinolike_eval` when that name is installed (a wheel, or an editable install of this checkout);
- `eval` in a checkout that is not installed, when that name is this checkout's folder: a SLURM node
  unpickles a submitted job by module name, and in such a checkout it finds `eval` the same way;
- `dinolike_eval`, loaded from the checkout's folder, when `eval` is some other package.
Never another package called `eval`.
"""

from __future__ import annotations

import functools
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


def _finds(name: str, path: Path) -> bool:
    """True when importing `name` would load the package folder `path`, not some other package."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    return any(Path(p).resolve() == path.resolve() for p in locations)


@functools.cache
def package_name(folder: str) -> str:
    """The name `folder`'s package is imported under in this process (see the module docstring)."""
    name = installed_name(folder)
    source = _source_folder(folder)
    if source is None:  # an installed wheel: only the dinolike_ name is ours
        return name
    for candidate in (name, folder):  # installed editable from this checkout; this checkout on sys.path
        if _finds(candidate, source):
            return candidate
    _load_package(name, source)  # `folder` is another package: load ours under the installed name
    return name


def import_command(dotted: str) -> ModuleType:
    """`eval.knn` -> that module of this dinolike's `eval` folder, never another package named `eval`."""
    folder, _, rest = dotted.partition(".")
    name = package_name(folder)
    return importlib.import_module(f"{name}.{rest}" if rest else name)
