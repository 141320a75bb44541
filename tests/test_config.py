"""The strict config: unknown keys and wrong types are errors that name the key; every key is read."""

import re
from pathlib import Path

import pytest
from omegaconf import DictConfig

from dinolike.config import CONFIG_DIR, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads(path: Path) -> None:
    assert isinstance(load_config(path), DictConfig)


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, DictConfig):
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_every_config_key_is_read_somewhere() -> None:
    """A key no code reads is a lie in the schema (dinov3 ships eleven of them)."""
    source = "\n".join(p.read_text() for p in (REPO / "dinolike").rglob("*.py"))
    unread = []
    for key in _leaf_keys(load_config(None)):
        section, leaf = key.rsplit(".", 1)
        # read as cfg.section.leaf, c.leaf after `c = cfg.section`, or through a model-config mapping
        if not re.search(rf"\.{leaf}\b|\"{leaf}\"|\b{leaf}\b.*_VIT_KEYS|_VIT_KEYS.*\b{leaf}\b", source):
            unread.append(key)
    assert not unread, f"config keys no code reads: {unread}"
