"""The eval protocols' settings as typed records, built from their schema section (configs/eval/base.yaml).

The schema is the only source of truth for every setting: the records below have no defaults, a record
is built from the merged config (`KnnConfig.of(cfg.eval.knn)`), and `eval_settings("linear", epochs=2)`
gives the schema's values with a few replaced (tests, benchmarks and training's periodic kNN use it).
`of` refuses a section whose keys differ from the record's fields, so the schema and the code cannot
drift apart silently (tests/test_eval_settings.py checks every record against the schema).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from dinolike.config import CONFIG_DIR, ConfigError, load_schema

SCHEMA = CONFIG_DIR / "eval" / "base.yaml"
T = TypeVar("T")


class _FromSection:
    """`of(section)`: the record of a schema section, every field read from it, nothing defaulted."""

    @classmethod
    def of(cls: type[T], section: DictConfig | Mapping[str, Any]) -> T:
        values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if set(values) != names:
            raise ConfigError(f"{cls.__name__}: the schema section has keys {sorted(values)}, the record "
                              f"{sorted(names)}: configs/eval/base.yaml and dinolike/eval/settings.py disagree")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # type: ignore[call-arg]


@dataclass(frozen=True)
class KnnConfig(_FromSection):
    """`eval.knn`: weighted kNN (DINO's protocol)."""

    ks: tuple[int, ...]
    temperature: float
    chunk: int  # test rows per similarity block
    features: str  # cls | cls+patches


@dataclass(frozen=True)
class LinearConfig(_FromSection):
    """`eval.linear`: the DINOv2 linear-probe grid."""

    lrs: tuple[float, ...]
    n_last_blocks: tuple[int, ...]
    avgpool: tuple[bool, ...]
    epochs: int
    standardize: bool
    batch_size: int
    momentum: float
    weight_decay: float
    val_fraction: float
    min_steps: int
    min_val_per_class: int
    cpu_threads: int | None


@dataclass(frozen=True)
class LogregConfig(_FromSection):
    """`eval.logreg`: L2 logistic regression, sweeping C."""

    cs: tuple[float, ...]
    max_iter: int
    val_fraction: float
    min_val_per_class: int
    standardize: bool
    backend: str
    blas_threads: int | None


RECORDS: dict[str, type] = {"knn": KnnConfig, "linear": LinearConfig, "logreg": LogregConfig}


def schema_section(name: str) -> DictConfig:
    """`eval.<name>` of the eval schema as shipped."""
    return load_schema(SCHEMA).eval[name]


def eval_settings(name: str, **changes: Any) -> Any:
    """The schema's `eval.<name>` record with `changes` applied (each must be a field of the record)."""
    record = RECORDS[name].of(schema_section(name))
    try:
        return dataclasses.replace(record, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})
    except TypeError as e:
        raise ConfigError(f"eval.{name}: {e}") from None
