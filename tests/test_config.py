"""The strict config: unknown keys and wrong types are errors that name the key; every key is read;
every shipped recipe (training and curation) is one a run can actually start from."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dinolike.config import BASE, CONFIG_DIR, ConfigError, load_config
from dinolike.data.datasets import DATASET_SCHEMES

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p != BASE)
CURATION_RECIPES = sorted(p for p in (CONFIG_DIR / "curation").glob("*.yaml") if p.name != "base.yaml")
EVAL_SCHEMA = CONFIG_DIR / "eval" / "base.yaml"


def test_unknown_key_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.base_rl'.*did you mean 'optim\.base_lr'"):
        load_config(None, ["optim.base_rl=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'nosuch.key'"):
        load_config(None, ["nosuch.key=1"])


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  archh: vit_small\n")
    with pytest.raises(ConfigError, match=r"'model\.archh' in .*bad\.yaml.*did you mean 'model\.arch'"):
        load_config(f)


def test_wrong_type_and_missing_equals() -> None:
    with pytest.raises(ConfigError, match="must be float"):
        load_config(None, ["optim.base_lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.base_lr"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["optim=1"])


def test_precedence_defaults_file_cli(tmp_path: Path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_text("optim:\n  base_lr: 0.5\n  epochs: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\noptim:\n  epochs: 9\n")
    cfg = load_config(child, ["optim.epochs=11"])
    assert cfg.optim.base_lr == 0.5 and cfg.optim.epochs == 11 and cfg.optim.min_lr == 1e-6


# ---------------------------------------------------------------------------------- shipped recipes


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, DictConfig) and len(v):
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _own_keys(path: Path) -> dict[str, object]:
    """The leaf values a recipe file itself sets (not its `base:`)."""
    raw = OmegaConf.load(path)
    raw.pop("base", None)
    return {k: OmegaConf.select(raw, k) for k in _leaf_keys(raw)}


def _as_plain(v: object) -> object:
    return OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v


def _check_sets_what_it_says(path: Path, cfg: DictConfig) -> None:
    for key, value in _own_keys(path).items():
        assert _as_plain(OmegaConf.select(cfg, key)) == _as_plain(value), f"{path.name}: {key} did not take effect"


@functools.cache
def _writers() -> dict[str, str]:
    """run.output_dir -> the recipe that writes it."""
    return {str(load_config(p).run.output_dir): p.name for p in RECIPES}


def test_recipes_write_distinct_run_folders() -> None:
    """Two recipes writing one folder would resume (or overwrite) each other's checkpoints."""
    assert len(_writers()) == len(RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_can_start_a_run(path: Path) -> None:
    from dinolike.models import build_backbone
    from dinolike.training.distill import student_model_configs
    from dinolike.training.schedules import build_schedules

    cfg = load_config(path)
    _check_sets_what_it_says(path, cfg)
    m, c, d = cfg.model, cfg.crops, cfg.data
    # the crops cut into whole patches: masks and position embeddings are laid on that grid
    assert c.global_size % m.patch_size == 0 and c.local_size % m.patch_size == 0, path.name
    assert len(d.mean) == len(d.std) == d.channels == m.in_chans, path.name
    assert d.train.partition(":")[0] in DATASET_SCHEMES, d.train
    sched = build_schedules(cfg, d.batch_size)
    assert sched.total > cfg.optim.warmup_epochs * cfg.optim.epoch_length, "the warmup outlasts the run"
    with torch.device("meta"):  # shapes only: a ViT-g costs nothing here
        for i, model_cfg in enumerate(student_model_configs(cfg)):
            backbone = build_backbone(model_cfg)
            assert backbone.patch_size == m.patch_size, f"student {i} of {path.name} sees other patches"
    # a phase or a distillation starts from a run folder another shipped recipe writes
    for source, key in ((cfg.run.init_from, "run.init_from"), (cfg.distill.teacher, "distill.teacher")):
        if source:
            writer = _writers().get(source)
            assert writer, f"{path.name}: {key}={source} is no shipped recipe's run.output_dir"
            parent = load_config(CONFIG_DIR / writer)
            assert parent.model.patch_size == m.patch_size and parent.model.in_chans == m.in_chans
            if key == "run.init_from":  # the loop refuses a phase that does not extend the schedule
                assert build_schedules(parent, d.batch_size).total < sched.total, path.name


@pytest.mark.parametrize("path", CURATION_RECIPES, ids=lambda p: p.name)
def test_every_curation_recipe_can_run(path: Path) -> None:
    from dinolike.curation.config import load_config as load_curation
    from dinolike.curation.steps import STEPS

    cfg = load_curation(path)
    _check_sets_what_it_says(path, cfg)
    for spec in [*cfg.pool, *cfg.references, *cfg.seeds]:
        assert spec.partition(":")[0] in DATASET_SCHEMES and spec.partition(":")[2], spec
    assert cfg.pool, f"{path.name}: nothing to curate"
    assert set(cfg.build.sources) <= set(STEPS) - {"embed", "build"} and cfg.build.sources
    assert set(cfg.retrieve.methods) <= {"sample", "cluster"} and cfg.retrieve.methods
    assert list(cfg.sample.levels) == sorted(cfg.sample.levels, reverse=True), "levels shrink bottom up"
    if "retrieve" in cfg.build.sources:
        assert cfg.seeds, f"{path.name}: retrieval needs seed images"


def test_eval_schema_adds_keys_without_touching_the_training_ones() -> None:
    from dinolike.eval.settings import SCHEMA

    assert SCHEMA == EVAL_SCHEMA
    train_keys = set(_leaf_keys(OmegaConf.load(BASE)))
    eval_keys = set(_leaf_keys(OmegaConf.load(EVAL_SCHEMA)))
    assert eval_keys and not train_keys & eval_keys
    assert all(k.startswith("eval.") for k in eval_keys)


# ------------------------------------------------------------------------------- every key is read


def _sections(cfg: DictConfig, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in cfg.items():
        if isinstance(v, DictConfig):
            out |= {f"{prefix}{k}", *_sections(v, f"{prefix}{k}.")}
    return out


def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None unless the chain starts at a plain name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _own_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of one scope, nested functions and classes excluded (they are scopes of their own)."""
    out, todo = [], list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))
    return out


def config_reads(tree: ast.Module, schema: DictConfig) -> set[str]:
    """Dotted config paths a module reads: `x.section.key` chains (`cfg.run.compile`,
    `self.cfg.optim.clip_grad`), reads through a name bound to a section in the same or an enclosing
    scope (`c = cfg.collapse` ... `c.start_iters`, `c["k"]`, `c.get("k")`), and a string that is a whole
    dotted key (`OmegaConf.select(cfg, "data.mean")`)."""
    top = {k for k, v in schema.items() if isinstance(v, DictConfig)}
    sections = _sections(schema)
    reads: set[str] = set()

    def resolve(names: list[str], aliases: dict[str, list[str]]) -> list[str] | None:
        if names[0] in aliases:
            return aliases[names[0]] + names[1:]
        # a section after the first name: `cfg.run`, `self.cfg.run`, not a module or variable named `dist`
        return next((names[i:] for i in range(1, len(names)) if names[i] in top), None)

    def scan(scope: ast.AST, inherited: dict[str, list[str]]) -> None:
        aliases = dict(inherited)
        own = _own_nodes(scope)
        for node in sorted((n for n in own if isinstance(n, ast.Assign)), key=lambda n: n.lineno):
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))
                else:
                    pairs = [(target, node.value)]
                for name, value in pairs:
                    chain = _chain(value) if isinstance(name, ast.Name) else None
                    path = resolve(chain, aliases) if chain else None
                    if path and ".".join(path) in sections:
                        aliases[name.id] = path
        for node in own:
            key = None
            if isinstance(node, ast.Attribute) and (chain := _chain(node)):
                key = resolve(chain, aliases)
            elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in aliases:
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    key = [*aliases[node.value.id], node.slice.value]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                owner, args = getattr(node.func.value, "id", None), node.args
                if owner in aliases and args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                    key = [*aliases[owner], args[0].value]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
                key = node.value.split(".")
            if key:
                reads.add(".".join(key))
        for node in own:
            if isinstance(node, _SCOPES):
                scan(node, aliases)

    scan(tree, {})
    return reads


def unread_keys(schema: DictConfig, folders: list[Path], extra_reads: set[str] = frozenset()) -> list[str]:
    reads = set(extra_reads)
    for folder in folders:
        for path in folder.rglob("*.py"):
            reads |= config_reads(ast.parse(path.read_text()), schema)
    return [k for k in _leaf_keys(schema) if k not in reads]


CODE = [REPO / d for d in ("dinolike", "eval", "curation", "launch")]


def test_every_config_key_is_read_somewhere() -> None:
    """A key no code reads is a lie in the schema (dinov3 ships eleven of them). Reads are matched as
    `section.key`, so `.compile` in `m.compile()` does not count as reading `run.compile`."""
    from dinolike.eval.settings import RECORDS
    from dinolike.models import _VIT_KEYS

    vit_keys = {f"model.{k}" for k in _VIT_KEYS}  # build_backbone reads these through its key list
    assert not (unread := unread_keys(OmegaConf.load(BASE), CODE, vit_keys)), f"config keys no code reads: {unread}"
    eval_schema = OmegaConf.load(EVAL_SCHEMA)
    # a protocol's section is read whole into its record, which refuses a key it lacks (eval/settings.py)
    records = {f"eval.{name}.{k}" for name in RECORDS for k in eval_schema.eval[name]}
    unread = unread_keys(eval_schema, [REPO / "dinolike" / "eval", REPO / "dinolike" / "commands"], records)
    assert not unread, f"eval keys no code reads: {unread}"


def test_the_key_read_check_can_fail(tmp_path: Path) -> None:
    """A key only mentioned as a leaf elsewhere (`m.compile()`, `args.seed`) is unread; aliases count."""
    schema = OmegaConf.create({"run": {"compile": False, "seed": 0}, "collapse": {"start_iters": 1}})
    (tmp_path / "a.py").write_text(
        "def f(cfg, m, args):\n    m.compile()\n    c = cfg.collapse\n    return args.seed, c.start_iters\n"
    )
    assert unread_keys(schema, [tmp_path]) == ["run.compile", "run.seed"]
    (tmp_path / "b.py").write_text("def g(self):\n    r = self.cfg.run\n    return r['seed'], self.cfg.run.compile\n")
    assert unread_keys(schema, [tmp_path]) == []


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config fmnist_smoke.yaml` (or the repository spelling `configs/...`) outside the checkout reads the
    shipped recipe; a file of the current folder comes first; a missing one names every place looked in."""
    monkeypatch.chdir(tmp_path)
    for name in ("fmnist_smoke.yaml", "configs/fmnist_smoke.yaml", str(CONFIG_DIR / "fmnist_smoke.yaml")):
        assert load_config(name).run.output_dir == "runs/fmnist_smoke", name
    (tmp_path / "fmnist_smoke.yaml").write_text("base: " + str(CONFIG_DIR / "fmnist_smoke.yaml") + "\n"
                                                "run: {output_dir: runs/mine}\n")
    assert load_config("fmnist_smoke.yaml").run.output_dir == "runs/mine"
    with pytest.raises(ConfigError, match=rf"config file not found: nope\.yaml \(looked in {tmp_path}, {CONFIG_DIR}"):
        load_config("nope.yaml")


def test_pipeline_stage_recipes_resolve_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline file's stage recipes: relative to the pipeline file, else the current folder, else the
    shipped ones (`configs/fmnist_smoke.yaml` in the shipped pipeline files)."""
    from dinolike.pipeline.config import load_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline("pipeline/fmnist_smoke.yaml", [f"output_dir={tmp_path / 'p'}"])
    assert cfg.pretrain.config == str(CONFIG_DIR / "fmnist_smoke.yaml")
    assert list(cfg.highres.config) == [str(CONFIG_DIR / "fmnist_smoke.yaml"), str(CONFIG_DIR / "fmnist_highres.yaml")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pipe.yaml").write_text("stages: [pretrain]\npretrain: {config: recipe.yaml}\n")
    (mine / "recipe.yaml").write_text("base: fmnist_smoke.yaml\n".replace("fmnist", str(CONFIG_DIR / "fmnist")))
    assert load_pipeline(mine / "pipe.yaml").pretrain.config == str(mine / "recipe.yaml")
    with pytest.raises(ConfigError, match=r"pretrain\.config: file not found: nope\.yaml \(looked in "):
        load_pipeline(mine / "pipe.yaml", ["pretrain.config=nope.yaml"])


def test_renamed_precision_keys_still_load_with_one_warning(caplog) -> None:
    """`dist.cpu_bf16` / `dist.mixed_precision` (before precision got its own section) load as
    `precision.cpu` / `precision.cuda`, values translated, with a warning naming the new key."""
    from dinolike import config as config_module

    config_module._warned.clear()
    with caplog.at_level("WARNING", logger="dinolike.config"):
        cfg = load_config(BASE, ["dist.cpu_bf16=true", "dist.mixed_precision=fp32"])
        load_config(BASE, ["dist.cpu_bf16=false"])
    assert cfg.precision.cpu == "bf16" and cfg.precision.cuda == "fp32" and "cpu_bf16" not in cfg.dist
    assert load_config(BASE, ["dist.cpu_bf16=false"]).precision.cpu == "fp32"
    assert load_config(BASE, ["dist.cpu_bf16=auto"]).precision.cpu == "auto"
    warned = [r.getMessage() for r in caplog.records]
    assert sum("'dist.cpu_bf16' is now 'precision.cpu'" in m for m in warned) == 1, warned
    assert any("'dist.mixed_precision' is now 'precision.cuda'" in m for m in warned)
