"""A run's config resolved from its layers: a preset, then a user YAML file, then the `--loss`
variant, then `--set section.key=value` overrides; validated before anything loads, and where the
learning rate was set kept for the plan (`Config.origins`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .checks import validate
from .errors import ConfigError
from .files import from_dict, read_yaml
from .inheritance import check_cycle, deep_merge, follow_inherit, is_path_ref, load_preset_dict
from .parse import parse_scalar, suggest
from .rates import TRAINED_MODES, parse_learning_rates
from .schema import SECTIONS, Config, LossConfig, section_fields

def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` split into the key's path and the value (numbers read as numbers)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. training.learning_rate=1e-6")
    key, value = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{item}': empty key")
    return path, parse_scalar(value)


def apply_override(data: dict, item: str) -> dict:
    """Apply one `section.key=value` to a raw mapping, checking the key exists."""
    path, value = parse_override(item)
    _check_override_key(path, item)
    out = copy.deepcopy(data)
    node = out
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
    node[path[-1]] = value
    return out


def _check_override_key(path: list[str], item: str) -> None:
    """The key of `--set item` names a config key (free-form sections are checked later)."""
    section = path[0]
    if section not in SECTIONS:
        raise ConfigError(f"override '{item}': unknown section '{section}'.{suggest(section, list(SECTIONS))}")
    if section == "variants" or (section == "loss" and len(path) >= 2 and path[1] == "params"):
        pass  # free-form: validated by the loss registry later
    elif section == "description":
        pass
    elif path[:2] == ["training", "learning_rates"] and len(path) == 3:
        if path[2] not in TRAINED_MODES:  # training.learning_rates.lora=1e-5
            parse_learning_rates({path[2]: 1.0}, f"override '{item}': training.learning_rates")
    else:
        if len(path) != 2:
            raise ConfigError(f"override '{item}': expected {section}.<key>=value")
        fields = section_fields(section)
        if path[1] not in fields:
            raise ConfigError(f"override '{item}': unknown key '{section}.{path[1]}'.{suggest(path[1], list(fields))}")


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple = (),
    loss: str | None = None,
) -> Config:
    """Preset, then a user YAML file, then `--loss` variant, then `--set` overrides.

    Where the learning rate was set is kept in `Config.origins` (the plan shows it): a preset's
    ("preset NAME", "preset NAME, dpo variant") or the user's ("user: --set ...", "user: config FILE")."""
    data: dict = load_preset_dict(preset) if preset else {}
    origins: dict[str, str] = {}
    _note_origins(origins, data, f"preset {preset}")
    if config_file:
        data = _with_user_file(data, origins, Path(config_file).expanduser())
    if loss:
        variant = (data.get("variants") or {}).get(loss) or {}
        _note_origins(origins, variant, f"{'preset ' + preset if preset else 'config'}, {loss} variant")
        data = apply_loss_variant(data, loss)
    for item in overrides:
        data = _with_override(data, origins, item)
    cfg = from_dict(data, source=f"preset {preset}" if preset else "config")
    cfg.origins = origins
    validate(cfg)
    return cfg


def _with_user_file(data: dict, origins: dict, path: Path) -> dict:
    """The user's YAML file over `data` (the preset); what the file inherits goes under both."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    user = read_yaml(path.read_text(encoding="utf-8"), str(path))
    if "inherit" in user:  # what the file inherits sits under the preset, the file over both
        ref = user.pop("inherit")
        chain = check_cycle(f"file:{path.resolve()}", str(path), ())
        parent = follow_inherit({"inherit": ref}, str(path), path.parent, chain)
        kind = "config" if isinstance(ref, str) and is_path_ref(ref.strip()) else "preset"
        _note_origins(origins, parent, f"{kind} {str(ref).strip()} (inherited by {path})", over=data)
        data = deep_merge(parent, data)
    _note_origins(origins, user, f"user: config {path}")
    return deep_merge(data, user)


def _with_override(data: dict, origins: dict, item: str) -> dict:
    """One `--set` applied, the learning-rate keys it sets recorded as the user's."""
    data = apply_override(data, item)
    key = parse_override(item)[0]
    if key[:1] == ["training"] and len(key) > 1 and key[1] in ("learning_rate", "learning_rates"):
        set_keys = _lr_keys({key[1]: data["training"][key[1]]}) if len(key) == 2 else {".".join(key[1:])}
        for k in set_keys:
            origins[k] = f"user: --set {'.'.join(key)}"
    return data


def _lr_keys(section: dict | None) -> set[str]:
    """The learning-rate keys a raw `training` mapping sets: "learning_rate", "learning_rates.<mode>"."""
    section = section if isinstance(section, dict) else {}
    keys = {"learning_rate"} & set(section)
    rates = section.get("learning_rates")
    if isinstance(rates, dict):
        keys |= {f"learning_rates.{mode}" for mode in rates}
    return keys


def _note_origins(origins: dict, layer: dict, label: str, *, over: dict | None = None) -> None:
    """Record `label` for the learning-rate keys `layer` sets (unless `over`, merged on top, sets them too)."""
    for key in _lr_keys((layer or {}).get("training")) - _lr_keys((over or {}).get("training")):
        origins[key] = label


def apply_loss_variant(data: dict, loss: str) -> dict:
    """Switch method, taking this preset's tuned settings for it when it has them."""
    from ..losses import get_loss

    get_loss(loss)  # unknown names fail here with the list of valid ones
    variants = data.get("variants") or {}
    out = copy.deepcopy(data)
    if loss in variants:
        out = deep_merge(out, variants[loss])
        out.setdefault("loss", {})["name"] = loss
        if "params" in (variants[loss].get("loss") or {}):
            out["loss"]["params"] = dict(variants[loss]["loss"]["params"])
    else:
        current = (data.get("loss") or {}).get("name", LossConfig.name)
        if current != loss:
            out.setdefault("loss", {})["name"] = loss
            out["loss"]["params"] = {}
    return out
