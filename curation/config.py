"""Curation config: `configs/curation/base.yaml` (the schema) <- pipeline file <- command-line dot-list.

Strict like the training config (same merge rules, shared code in `dinolike.config`): a key the schema does
not hold is an error naming it, so a typo such as `dedup.treshold=0.5` cannot silently curate with 0.6.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dinolike.config import ConfigError
from dinolike.config import load_config as _load_strict

SCHEMA = Path(__file__).resolve().parent.parent / "configs" / "curation" / "base.yaml"

__all__ = ["SCHEMA", "ConfigError", "load_config", "section_fingerprint"]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema merged with the pipeline file(s) and `key=value` overrides; unknown keys raise ConfigError."""
    return _load_strict(path, overrides, schema_file=SCHEMA)


def section_fingerprint(*parts: Any) -> str:
    """Stable hash of config sections / values: a step's output records the inputs it was computed from,
    so a rerun with the same inputs is skipped and one with changed inputs recomputes."""
    plain = [OmegaConf.to_container(p, resolve=True) if isinstance(p, (DictConfig, ListConfig)) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
