"""The pipeline config: `configs/pipeline/base.yaml` <- pipeline file <- `key=value`, through the strict loader.

A stage does not copy its command's keys: it names the command's recipe (`config`) and overrides. On the
command line `STAGE.KEY=VALUE` whose KEY is not a pipeline key of that stage goes to the stage's overrides,
so `pretrain.optim.epochs=3` changes the pretraining recipe and `pretrain.config=x.yaml` the pipeline.

A stage's `config` may be a list of recipes, layered: the first with its `base:` chain, each later one as
a delta on it (only its own keys). `[fmnist_smoke.yaml, fmnist_highres.yaml]` is the high-res phase of the
smoke recipe. A later recipe's own `base:` chain must already be part of the first's, or its delta would
be applied to a recipe it was not written for.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from dinolike.config import CONFIG_DIR, ConfigError, _read_yaml_chain, find_config, load_config

SCHEMA = CONFIG_DIR / "pipeline" / "base.yaml"
STAGES = ("curate", "pretrain", "highres", "distill", "eval")
TRAIN_STAGES = ("pretrain", "highres", "distill")


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(pipeline overrides, {stage: command overrides}) from the command line's `key=value` list."""
    schema = OmegaConf.load(SCHEMA)
    own, per_stage = [], {s: [] for s in STAGES}
    for item in overrides:
        key, eq, value = item.partition("=")
        head, _, rest = key.partition(".")
        if eq and head in STAGES and rest and rest.partition(".")[0] not in schema[head]:
            per_stage[head].append(f"{rest}={value}")
        else:
            own.append(item)
    return own, per_stage


def load_pipeline(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """The merged pipeline config, stage overrides from the command line appended, output_dir absolute."""
    own, per_stage = split_overrides(list(overrides or []))
    cfg = load_config(path, own, schema_file=SCHEMA)
    stages = [str(s) for s in cfg.stages]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"stages must be a non-empty subset of {list(STAGES)}, got {stages}")
    if stages != [s for s in STAGES if s in stages]:
        raise ConfigError(f"stages run in the order {list(STAGES)}, got {stages}")
    for stage, extra in per_stage.items():
        cfg[stage].overrides = [*cfg[stage].overrides, *extra]
    here = [find_config(path).parent] if path is not None else []
    for stage in stages:
        if stage != "eval" and not cfg[stage].config:
            raise ConfigError(f"stage {stage!r} needs its command's recipe: set {stage}.config")
        if stage != "eval":
            cfg[stage].config = _found_recipes(cfg[stage].config, here, stage)
    cfg.output_dir = str(Path(cfg.output_dir).absolute())
    return cfg


def _found_recipes(value: str | ListConfig, search: list[Path], stage: str) -> str | list[str]:
    """A stage's recipe(s) as absolute paths: relative to the pipeline file, the current folder, or the
    recipes shipped with dinolike (`find_config`), so a pipeline runs from any folder."""
    items = [value] if isinstance(value, str) else list(value)
    found = [str(find_config(str(v), search, what=f"{stage}.config: file")) for v in items]
    return found[0] if isinstance(value, str) else found


def recipe_files(value: str | ListConfig | list | None) -> list[Path]:
    """A stage's `config` as a list of recipe paths (a single path or a list)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [Path(str(v)).absolute() for v in items]


def layered_recipe(files: list[Path]) -> dict:
    """One recipe dict equivalent to layering `files` (see the module docstring): `base:` the first file,
    then the later files' own keys merged in order."""
    if not files:
        raise ConfigError("a stage needs at least one recipe file")
    chain = {Path(source) for _, source in _read_yaml_chain(files[0])}
    merged = OmegaConf.create({})
    for f in files[1:]:
        links = _read_yaml_chain(f)
        outside = [s for _, s in links[:-1] if Path(s) not in chain]
        if outside:
            raise ConfigError(f"{f} is a delta on {outside[-1]}, which {files[0]} does not build on: "
                              "its keys cannot be layered on that recipe")
        merged = OmegaConf.merge(merged, links[-1][0])  # its own keys (the loader already removed `base`)
        chain.add(Path(links[-1][1]))
    return {"base": str(files[0]), **OmegaConf.to_container(merged)}
