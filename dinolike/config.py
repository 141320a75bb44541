"""Config loading: the schema `configs/base.yaml` <- recipe file(s) <- command-line dot-list.

One loader for every command: training (`configs/base.yaml`), curation (`configs/curation/base.yaml`) and
evaluation (`configs/eval/base.yaml` next to the training schema) differ only in their schema files.

The schema is strict: a key it does not hold is an error that names the key and suggests the closest
known one (the official code accepts typos silently, and a mistyped learning-rate key trains the default).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from dinolike.errors import DinolikeError


def _shipped_config_dir() -> Path:
    """The recipes that ship with dinolike: the top-level `configs/` of a source checkout (an editable
    install too), else the copy a wheel installs inside the package (`dinolike/configs`, package data in
    pyproject.toml). A wheel has no checkout beside it, and a `configs/` folder next to an installed
    package in site-packages would be another distribution's."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "configs"
    if (here.parent / "pyproject.toml").is_file() and (checkout / "base.yaml").is_file():
        return checkout
    return here / "configs"


CONFIG_DIR = _shipped_config_dir()
BASE = CONFIG_DIR / "base.yaml"


class ConfigError(DinolikeError, ValueError):
    """A config problem the user can fix; the message says which key or file."""


def find_config(path: str | Path, search: Sequence[Path] = (), what: str = "config file") -> Path:
    """The recipe file `path` names: relative to each folder of `search` first (a pipeline file's own
    folder), else as given (absolute, or relative to the current folder), else one of the
    recipes shipped with dinolike (`fmnist_smoke.yaml`, `curation/fmnist_demo.yaml`, or the repository
    spelling `configs/fmnist_smoke.yaml`), so `--config NAME.yaml` works from any folder and from a wheel.
    Raises ConfigError naming every place it looked."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_absolute():
        if path.is_file():
            return path
        raise ConfigError(f"{what} not found: {path}")
    tried = [*(Path(d) / path for d in search), Path.cwd() / path, CONFIG_DIR / path]
    if path.parts[0] == CONFIG_DIR.name and len(path.parts) > 1:  # configs/x.yaml from outside the checkout
        tried.append(CONFIG_DIR.parent / path)
    for candidate in tried:
        if candidate.is_file():
            return candidate.absolute()
    if not path.suffix:  # `--config fmnist_smoke`: the recipe's name without .yaml
        return find_config(path.with_name(f"{path.name}.yaml"), search, what)
    looked = ", ".join(dict.fromkeys(str(c.parent) for c in tried))
    close = difflib.get_close_matches(path.name, [p.name for p in CONFIG_DIR.glob("*.yaml")], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"{what} not found: {path} (looked in {looked}){hint}")


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(v, DictConfig):
            keys.extend(_all_keys(v, name + "."))
    return keys


def _unknown_key_error(schema: DictConfig, key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(schema), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[DictConfig, str]]:
    """A recipe may start from another (`base: file.yaml`, relative to it): returns the chain, root first."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config files include each other in a loop: {path}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of sections")
    parent = cfg.pop("base", None)
    chain = _read_yaml_chain(path.parent / parent, (*seen, path)) if parent else []
    return [*chain, (cfg, str(path))]


# Keys that moved: old name -> (new name, old value -> new value; None: the same). A file or an override
# with the old name still loads, translated, with one warning naming the new key.
RENAMED: dict[str, tuple[str, dict | None]] = {
    "dist.mixed_precision": ("precision.cuda", None),
    "dist.cpu_bf16": ("precision.cpu", {True: "bf16", False: "fp32", "auto": "auto"}),
}
_warned: set[str] = set()


def _translate_renamed(delta: DictConfig, source: str) -> DictConfig:
    """`delta` with every RENAMED key under its new name (and value); warns once per old key."""
    tree = OmegaConf.to_container(delta)
    moved = False
    for old, (new, values) in RENAMED.items():
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if values is not None and value in values:
            value = values[value]
        *new_parents, new_leaf = new.split(".")
        target = tree
        for part in new_parents:
            target = target.setdefault(part, {})
        target[new_leaf] = value
        moved = True
        if old not in _warned:
            _warned.add(old)
            logging.getLogger("dinolike.config").warning("%s: '%s' is now '%s' (read as %s=%s)", source, old,
                                                         new, new, value)
    return OmegaConf.create(tree) if moved else delta


def check_type(key: str, default: object, value: object, source: str) -> None:
    """Values must keep the schema's type (a number stays a number); null defaults accept anything."""
    if default is None or value is None:
        return
    ok = {
        bool: (bool,),
        int: (int,),
        float: (int, float),
        str: (str,),
        ListConfig: (ListConfig, list, tuple),
    }
    for typ, allowed in ok.items():
        if isinstance(default, typ):
            if not isinstance(value, allowed) or (typ is not bool and isinstance(value, bool)):
                raise ConfigError(
                    f"'{key}' in {source} must be {typ.__name__.replace('ListConfig', 'list')}, got {value!r}"
                )
            return


def _merge_strict(cfg: DictConfig, delta: DictConfig, source: str, schema: DictConfig,
                  dropped: list[str] | None = None) -> DictConfig:
    """Merge `delta` into `cfg`; keys and types are checked against the pristine schema (base.yaml).
    With `dropped` (a list), keys the schema does not know are removed and listed there, not an error."""
    delta = _translate_renamed(delta, source)
    flat = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, DictConfig) and len(v) and not (prefix + k).startswith("distill.students"):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + str(k)] = v

    walk(delta, "")
    for key in flat:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        if not isinstance(node, DictConfig) or leaf not in node:
            if dropped is None:
                raise _unknown_key_error(schema, key, source)
            dropped.append(key)
            continue
        if isinstance(node[leaf], DictConfig) and not isinstance(flat[key], DictConfig):
            raise ConfigError(f"'{key}' in {source} is a section; set its keys ({key}.KEY=VALUE)")
        check_type(key, node._get_node(leaf)._value(), flat[key], source)
    if dropped:
        delta = OmegaConf.create(_without(OmegaConf.to_container(delta), dropped))
    try:
        return OmegaConf.merge(cfg, delta)
    except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
        raise ConfigError(f"bad value in {source}: {e}") from None


def _without(tree: dict, keys: Iterable[str]) -> dict:
    """`tree` with the dotted `keys` removed."""
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.get(p, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def load_schema(*files: Path) -> DictConfig:
    """One command's schema from several files, merged in order (the eval commands: their own `eval.*`
    keys next to the training schema, whose run configs they read)."""
    return OmegaConf.merge(*(OmegaConf.load(f) for f in files))


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema_file: Path = BASE,
    schema: DictConfig | None = None,
    dropped: list[str] | None = None,
    delta: Mapping[str, object] | None = None,
) -> DictConfig:
    """Merged, read-only-schema config. `overrides` are `section.key=value` strings, then `delta` a nested
    mapping (the Python API's keyword arguments), both checked like a file; the schema is
    `schema_file` (the training one by default; curation has its own) or, when given, `schema`.
    `dropped` (a list): keys of the file the schema does not know are left out and listed there instead
    of failing (a run's config.yaml written by another dinolike version); overrides stay strict."""
    schema = OmegaConf.load(schema_file) if schema is None else schema
    cfg = schema.copy()
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        for part, source in _read_yaml_chain(find_config(path)):
            cfg = _merge_strict(cfg, part, source, schema, dropped)
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"command-line overrides must be key=value, got: {' '.join(bad)}")
    if overrides:
        cfg = _merge_strict(cfg, OmegaConf.from_dotlist(list(overrides)), "the command line", schema)
    if delta:
        cfg = _merge_strict(cfg, OmegaConf.create(dict(delta)), "the call's arguments", schema)
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_container(cfg: DictConfig | ListConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def check_values(cfg: DictConfig, choices: Mapping[str, Collection] = {},  # noqa: B006 - read only
                 minimum: Mapping[str, float] = {}, fractions: Iterable[str] = ()) -> None:  # noqa: B006
    """Raise ConfigError naming the first key whose value is not one of its `choices`, is below its
    `minimum`, or (for `fractions`) is outside [0, 1]. Lists are checked element by element."""
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        for v in value if isinstance(value, ListConfig) else [value]:
            if v not in allowed:
                raise ConfigError(f"{key} must be {'made of' if isinstance(value, ListConfig) else 'one of'} "
                                  f"{', '.join(map(str, allowed))}; got {v!r}")
    for key, low in minimum.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    for key in fractions:
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be between 0 and 1, got {value}")


# Keys that change how a run runs but not what it computes (a worker count, a checkpoint interval or a
# progress bar changes no weight): changing them resumes a run (and a pipeline stage) instead of refusing
# or starting over.
OPERATIONAL = (
    "run.progress", "run.log_every", "run.checkpoint_every", "run.keep_last", "run.time_limit_min",
    "run.tensorboard", "run.wandb", "run.compile", "run.compile_mode", "data.num_workers", "data.pin_memory",
    "data.augment_on_device", "dist.activation_checkpointing", "dist.activation_checkpointing_scope",
    "embed.progress", "embed.num_workers",
)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: one entry per leaf (lists are leaves)."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every leaf both configs hold with different values, sorted by key.
    `ignore`: keys, or sections written with a trailing dot ("eval."), left out. A key only one side holds
    is no change: the schema gained or lost it between the two dinolike versions that wrote them."""
    a, b = flatten(old), flatten(new)
    skip = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == s or (s.endswith(".") and key.startswith(s)) for s in skip)

    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not ignored(k)]
