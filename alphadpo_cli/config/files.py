"""A config from YAML: the raw mapping read, then typed into a `Config` with every key checked
(misspelled ones refused with a suggestion); and a run's config.yaml written and read back."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..io import atomic_write_text
from .errors import ConfigError
from .parse import coerce_field, parse_scalar, suggest
from .rates import parse_learning_rates
from .schema import SECTIONS, Config, section_fields


def read_yaml(path_or_text, source: str) -> dict:
    """The top-level mapping of a YAML text (empty: {}), or a ConfigError naming `source`."""
    try:
        data = yaml.safe_load(path_or_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config, refusing unknown keys with a suggestion."""
    cfg = Config()
    for key, value in (data or {}).items():
        if key in ("inherit",):
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{key}'.{suggest(key, list(SECTIONS))}")
        if key == "description":
            cfg.description = str(value or "")
        elif key == "variants":
            cfg.variants = copy.deepcopy(value or {})
        elif not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping")
        else:
            _fill_section(getattr(cfg, key), key, value, source)
    return cfg


def _fill_section(section, key: str, value: dict, source: str) -> None:
    """Set the keys of one section (`model`, `training`, ...) from its raw mapping."""
    fields = section_fields(key)
    for sub, subval in value.items():
        if sub not in fields:
            raise ConfigError(f"{source}: unknown key '{key}.{sub}'.{suggest(sub, list(fields))}")
        if key == "loss" and sub == "params":
            subval = {k: parse_scalar(v) for k, v in (subval or {}).items()}
        elif key == "training" and sub == "learning_rates":
            subval = parse_learning_rates(subval, f"{source}: training.learning_rates")
        else:
            subval = coerce_field(subval, fields[sub].type, f"{source}: {key}.{sub}")
        setattr(section, sub, subval)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, cfg.to_yaml())


def load_config_file(path: str | Path) -> Config:
    path = Path(path)
    return from_dict(read_yaml(path.read_text(encoding="utf-8"), str(path)), source=str(path))
