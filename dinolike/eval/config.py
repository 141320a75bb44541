"""The eval jobs' config: the eval schema (configs/eval/base.yaml) <- the run's config <- overrides.

Every setting of an eval job is a key of the eval schema, with its default there and nowhere else: the
protocol's own section (`eval.knn`, `eval.linear`, `eval.logreg`), the feature pass (`eval.batch_size`,
`eval.resolution`, ...) and the job's inputs and outputs (`eval.pretrained`, `eval.train_dataset`,
`eval.output_dir`, ...: what the command's flags set). `job_config` builds it; the protocols in
`dinolike.eval.protocols` take it and nothing else.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinolike.config import BASE, ConfigError, check_type, find_config, load_config, load_schema
from dinolike.data.normalize import default_stats
from dinolike.eval.settings import SCHEMA

log = logging.getLogger(__name__)

PIXELS = "pixels"
RANDOM = "random"


class EvalError(Exception):
    """A user-facing problem (bad flag, bad checkpoint, bad dataset): printed without a traceback."""


def find_run_config(pretrained: str) -> Path | None:
    """config.yaml of the run a checkpoint came from (runs/X itself, runs/X/teacher_backbone.pth,
    runs/X/checkpoints/..)."""
    p = Path(pretrained).resolve()
    for d in ([p] if p.is_dir() else []) + [p.parent, p.parent.parent]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def resolve_config(pretrained: str, config: str | None, opts: Sequence[str]) -> tuple[DictConfig, bool]:
    """Schema (configs/eval/base.yaml + the training schema) <- run config <- command-line overrides,
    through the strict config loader; returns (config, has_model_config).

    The run config is `config` (a recipe/run YAML or an arch preset on top of configs/base.yaml), else
    the config.yaml of the run the checkpoint lives in. Without either, a checkpoint's architecture comes
    from the checkpoint itself (has_model_config False; no `model.*` key), and the pixel baseline needs no
    training key at all (only `eval.*`).
    """
    path, preset = None, None
    if config is not None:
        if os.path.isfile(config) or config.endswith((".yaml", ".yml")) or os.sep in config:
            try:  # a file here, or a recipe shipped with dinolike (`--config fmnist_cpu.yaml` from anywhere)
                path = str(find_config(config))
            except ConfigError as e:
                raise EvalError(str(e)) from None
        else:
            preset = config
    elif pretrained not in (PIXELS, RANDOM):
        found = find_run_config(pretrained)
        path = str(found) if found is not None else None
    has_model = path is not None or preset is not None
    if pretrained == RANDOM and not has_model:
        raise EvalError("--pretrained random needs --config (a run config or an arch preset)")
    if not has_model and pretrained == PIXELS:
        schema = load_schema(SCHEMA)
    else:  # the eval section first: results.json lists its keys before the run's
        schema = load_schema(SCHEMA, BASE)
        if not has_model:
            schema.pop("model")  # the schema's default model says nothing about this checkpoint
    overrides = [f"model.arch={preset}"] if preset else []
    dropped: list[str] = []
    try:
        cfg = load_config(path, [*overrides, *opts], schema=schema, dropped=dropped)
    except ConfigError as e:
        raise EvalError(str(e)) from e
    except Exception as e:  # omegaconf raises its own error types for malformed values
        raise EvalError(f"bad config or override {list(opts)}: {e}") from e
    if dropped:  # evaluating needs the model, data and eval keys, not every training key of its time
        log.warning("%s: ignoring %d key(s) this version does not know (another dinolike version's run?): %s",
                    path, len(dropped), ", ".join(dropped))
    OmegaConf.set_struct(cfg, False)  # load_backbone records the checkpoint's own model section
    cfg.eval.pretrained = pretrained
    return cfg, has_model  # has_model: "model" in cfg (the schema's model is dropped without one)


def set_job(cfg: DictConfig, job: Mapping[str, Any]) -> DictConfig:
    """Set the job keys `job` (`eval.<key>`: what the command's flags give) on `cfg`, type-checked against
    the schema; None leaves the schema's value."""
    schema = load_schema(SCHEMA).eval
    for key, value in job.items():
        if key not in schema:
            raise EvalError(f"unknown eval job key {key!r}")
        if value is not None:
            try:
                check_type(f"eval.{key}", schema[key], value, "the job")
            except ConfigError as e:
                raise EvalError(str(e)) from None
            cfg.eval[key] = value
    return cfg


def job_config(pretrained: str, config: str | None = None, opts: Sequence[str] = (),
               job: Mapping[str, Any] | None = None) -> DictConfig:
    """The checked config of one eval job: `resolve_config`, then the job keys, then `check_job`."""
    cfg, _ = resolve_config(pretrained, config, opts)
    set_job(cfg, job or {})
    check_job(cfg)
    return cfg


def check_job(cfg: DictConfig) -> None:
    """Everything checkable before a model or an image is loaded (the few-label split, the dataset specs'
    syntax), so a typo fails at once and not after the train features were extracted."""
    from dinolike.data.datasets import parse_spec

    e = cfg.eval
    if e.pretrained is None:
        raise EvalError("give the backbone to evaluate (--pretrained / eval.pretrained)")
    if e.which not in ("teacher", "student"):
        raise EvalError(f"--which must be teacher or student, got {e.which!r}")
    if e.train_fraction is not None and e.shots is not None:
        raise EvalError("give --train-fraction or --shots, not both")
    if e.train_fraction is not None and not 0 < e.train_fraction <= 1:
        raise EvalError(f"--train-fraction must be in (0, 1], got {e.train_fraction}")
    if e.shots is not None and e.shots < 1:
        raise EvalError(f"--shots must be >= 1, got {e.shots}")
    if e.label_seeds < 1:
        raise EvalError(f"--label-seeds must be >= 1, got {e.label_seeds}")
    for flag, spec in (("--train-dataset", e.train_dataset), ("--val-dataset", e.val_dataset)):
        try:
            parse_spec(str(spec))
        except ValueError as err:
            raise EvalError(f"{flag}: {err}") from None


def cfg_get(cfg: DictConfig, dotted: str, default: Any = None) -> Any:
    val = OmegaConf.select(cfg, dotted, default=default)
    return default if val is None else val


def data_stats(cfg: DictConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from the run config's data section, falling back to FMNIST (1 ch) / ImageNet (3 ch)."""
    mean, std = cfg_get(cfg, "data.mean"), cfg_get(cfg, "data.std")
    if mean is None or std is None:
        mean, std = default_stats(channels)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise EvalError(
            f"data.mean/std have {len(mean)}/{len(std)} values but the model takes {channels} channels; "
            "set data.mean=[...] data.std=[...] on the command line"
        )
    return mean, std


def eval_sizes(cfg: DictConfig, dataset_spec: str, patch_size: int | None) -> tuple[int, int]:
    """(resize, crop) of the eval transform; the crop is rounded up to a multiple of the patch size."""
    res = cfg_get(cfg, "eval.resolution") or cfg_get(cfg, "crops.global_size")
    if res is None:
        res = 28 if dataset_spec.startswith("fmnist") else 224
    res = int(res)
    if patch_size:
        rounded = math.ceil(res / patch_size) * patch_size
        if rounded != res:
            log.info("eval resolution %d is not a multiple of patch %d: using %d", res, patch_size, rounded)
        res = rounded
    resize = cfg_get(cfg, "eval.resize")
    if resize is None:
        resize = res if res <= 64 else round(res * 256 / 224)
    return int(resize), res


# The flags of `dinolike eval PROTOCOL` that a pipeline's protocol line may give (`linear --shots 10`): each
# sets the eval job key of the same name; the two switches set their key to false.
SWITCHES = {"--no-cache": "cache", "--no-progress": "progress"}
NOT_IN_A_LINE = ("pretrained", "config", "output_dir")  # the pipeline sets these itself


def protocol_line(line: str, protocols: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """A pipeline's `eval.protocols` entry -> (protocol, job keys, overrides): `PROTOCOL [--key VALUE |
    --no-cache | --no-progress | key=value ...]`, `--key` being any job key of the eval schema (the
    command's flags). Values are read as YAML scalars and type-checked when set. Raises EvalError."""
    words = line.split()
    bad = f"{line!r} is not a valid `dinolike eval` command line"
    if not words or words[0] not in protocols:
        raise EvalError(f"{line!r}: the protocol must be one of {', '.join(protocols)}")
    keys = load_schema(SCHEMA).eval
    job: dict[str, Any] = {}
    opts: list[str] = []
    rest = iter(words[1:])
    for word in rest:
        if word in SWITCHES:
            job[SWITCHES[word]] = False
        elif word.startswith("--"):
            key = word[2:].replace("-", "_")
            if key not in keys or isinstance(keys[key], DictConfig) or key in NOT_IN_A_LINE:
                raise EvalError(f"{bad}: unknown option {word}")
            value = next(rest, None)
            if value is None:
                raise EvalError(f"{bad}: {word} needs a value")
            job[key] = _scalar(value)
        elif "=" in word:
            opts.append(word)
        else:
            raise EvalError(f"{bad}: unexpected {word!r}")
    return words[0], job, opts


def _scalar(text: str) -> Any:
    """`0.1` -> 0.1, `10` -> 10, `fmnist:train` -> itself: a command-line word as the schema's types read it."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, type(None))) else text
