"""Imports run downwards only: no circle between project modules, no import up the floors of STYLE.md.

Every project module is parsed with `ast` (nothing is imported or run). Imports at module level and inside
functions count alike, and so do `import_module("x.y")` calls with a literal
name and the command table of `dinolike/cli.py`: a function-level import that goes upwards is still an
upward import, and a circle closed inside a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("dinolike", "eval", "curation", "launch", "benchmarks")

# The house, lowest floor first (STYLE.md). A module stands on the floor of the longest prefix listed
# here; an import may point to its own floor or lower. `dinolike` itself is only the package's __init__:
# the Python API's front door (dinolike.train / load / embed, imported from the commands on first use),
# so it stands on the command floor, and no library module may import the bare package.
FLOORS: dict[str, int] = {
    "dinolike": 5, "dinolike.config": 0,  # the strict config loader: any floor reads configs
    "dinolike.errors": 0,  # the error family's base (DinolikeError): every floor raises its members
    "dinolike.hashing": 0,  # one streamed file hash: checkpoint manifests, shard indexes, fingerprints
    "dinolike.layers": 1, "dinolike.loss": 1,
    "dinolike.models": 2, "dinolike.data": 2,
    # a run's saved state: training resumes from it, interop (export, eval, a teacher) reads backbones out of it
    "dinolike.checkpoints": 3,
    "dinolike.training": 3, "dinolike.dist": 3, "dinolike.fsdp": 3, "dinolike.interop": 3,
    "dinolike.local_procs": 3,
    # the feature extraction + kNN that training's periodic eval needs
    "dinolike.eval.features": 3, "dinolike.eval.knn": 3, "dinolike.eval.spread": 3, "dinolike.eval.embed": 3,
    "dinolike.eval.settings": 3,
    # the jobs, each a library function taking its config: eval protocols, curation steps, launching
    "dinolike.eval": 4, "dinolike.curation": 4, "dinolike.launch": 4, "dinolike.jobs": 4, "dinolike.pipeline": 4,
    # command shells on top: parse -> load config -> call a job; the checkout shims of eval/, curation/, launch/
    "dinolike.cli": 5, "dinolike.commands": 5, "dinolike.bench": 4, "eval": 5, "curation": 5, "launch": 5,
    "benchmarks": 6,
}
IMPORT_CALLS = ("import_module",)


def project_modules(repo: Path, roots: tuple[str, ...] = ROOTS) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the project's top-level folders."""
    out = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported dotted name lands in (its longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _relative_base(module: str, path: Path, level: int) -> str:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in `path`, wherever in the file it stands."""
    found: list[tuple[str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(_project_target(a.name, modules), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _relative_base(module, path, node.level) + (f".{base}" if base else "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = _project_target(sub, modules)
                found.append((target if target == sub else _project_target(base, modules), node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            arg = node.args[0] if node.args else None
            if func in IMPORT_CALLS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((_project_target(arg.value, modules), node.lineno))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and any(
            getattr(t, "id", None) == "COMMANDS" for t in getattr(node, "targets", [getattr(node, "target", None)])
        ):
            # the dispatcher's table: command -> (module, help); the modules are imported by name
            for entry in ast.walk(node.value):
                if isinstance(entry, ast.Tuple) and entry.elts and isinstance(entry.elts[0], ast.Constant):
                    found.append((_project_target(str(entry.elts[0].value).partition(":")[0], modules), entry.lineno))
    return [(t, line) for t, line in found if t is not None and t != module]


def import_graph(repo: Path, roots: tuple[str, ...] = ROOTS) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}."""
    modules = project_modules(repo, roots)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(module, path, modules):
            edges.setdefault(target, line)
        graph[module] = edges
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floor_of(module: str) -> int | None:
    if module == "dinolike":
        return FLOORS["dinolike"]
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS and prefix != "dinolike":
            return FLOORS[prefix]
    return None


def upward_imports(graph: dict[str, dict[str, int]], modules: dict[str, Path], repo: Path = REPO) -> list[str]:
    bad = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if floor_of(target) > floor_of(module):
                where = modules[module].relative_to(repo)
                bad.append(f"{where}:{line}: {module} (floor {floor_of(module)}) imports {target} "
                           f"(floor {floor_of(target)})")
    return bad


# ----------------------------------------------------------------------------------------------- tests


def test_every_module_stands_on_a_floor() -> None:
    missing = [m for m in project_modules(REPO) if floor_of(m) is None]
    assert not missing, f"modules on no floor (add them to FLOORS, as STYLE.md places them): {missing}"


def test_no_import_circles() -> None:
    graph = import_graph(REPO)
    found = circles(graph)
    detail = [[f"{m} -> {t} (line {graph[m][t]})" for m in group for t in graph[m] if t in group] for group in found]
    assert not found, f"import circles: {detail}"


def test_imports_point_down_the_floors() -> None:
    bad = upward_imports(import_graph(REPO), project_modules(REPO))
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """A circle closed only inside a function, through a relative import, and an upward import in a
    function body are both found: the test above can fail."""
    pkg = tmp_path / "dinolike" / "training"
    pkg.mkdir(parents=True)
    (tmp_path / "dinolike" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "loop.py").write_text("def build():\n    from .distill import Distill\n    return Distill\n")
    (pkg / "distill.py").write_text(
        "class Distill:\n    def f(self):\n        from dinolike.training.loop import build\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "__init__.py").write_text("")
    (tmp_path / "eval" / "knn.py").write_text("import importlib\nM = importlib.import_module('dinolike.training')\n")
    (pkg / "periodic.py").write_text("def knn():\n    from eval.knn import knn_eval\n")
    graph = import_graph(tmp_path, roots=("dinolike", "eval"))
    assert circles(graph) == [["dinolike.training.distill", "dinolike.training.loop"]]
    assert graph["eval.knn"] == {"dinolike.training": 2}
    modules = project_modules(tmp_path, roots=("dinolike", "eval"))
    assert upward_imports(graph, modules, tmp_path) == [
        "dinolike/training/periodic.py:2: dinolike.training.periodic (floor 3) imports eval.knn (floor 5)"
    ]
