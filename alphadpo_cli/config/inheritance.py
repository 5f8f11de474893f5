"""Presets and inheritance: the shipped presets (YAML files in the repository's presets/, inside
the wheel as the package data `alphadpo_cli.presets`) and user files, each following its
`inherit:` (a preset name, or a YAML file relative to the referring file), merged key by key."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

from ..values import did_you_mean
from .errors import ConfigError
from .files import read_yaml


def deep_merge(base: dict, override: dict) -> dict:
    """`override` over `base`, section by section; a `params` mapping merges one level only."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def preset_dir():
    """The shipped presets (a `importlib.resources` Traversable). Installed, they are the package
    `alphadpo_cli.presets` (pyproject maps the top-level presets/ onto it); run from a checkout that
    is not installed (the GPU check puts the tree on PYTHONPATH), the folder itself."""
    try:
        return resources.files("alphadpo_cli.presets")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "presets"


def preset_names() -> list[str]:
    """The shipped presets a run can name (files starting with _ are shared parts, not presets)."""
    return sorted(
        p.name[: -len(".yaml")]
        for p in preset_dir().iterdir()
        if p.name.endswith(".yaml") and not p.name.startswith("_")
    )


def is_path_ref(ref: str) -> bool:
    """`inherit:` names a file (relative to the referring file) rather than a preset."""
    return ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref or ref.startswith(("~", "."))


def check_cycle(ident: str, label: str, chain: tuple) -> tuple:
    """`chain` with (ident, label) added, or a ConfigError showing the loop when ident is in it already."""
    idents = [i for i, _ in chain]
    if ident in idents:
        loop = [lbl for _, lbl in chain[idents.index(ident):]] + [label]
        raise ConfigError(f"circular inherit: {' -> '.join(loop)} (a config cannot inherit itself)")
    return chain + ((ident, label),)


def follow_inherit(data: dict, source: str, base_dir: Path | None, chain: tuple) -> dict:
    """`data` merged over what its `inherit:` names (a preset, or a YAML file relative to base_dir)."""
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{source}: inherit must be a preset name or a path to a YAML file, not {parent!r}")
    parent = parent.strip()
    if is_path_ref(parent):
        if base_dir is None:  # a shipped preset: its parents are presets too
            stem = parent[: -len(Path(parent).suffix)] if parent.endswith((".yaml", ".yml")) else parent
            if "/" in stem or "\\" in stem:
                raise ConfigError(f"{source}: inherit {parent!r}: a preset inherits other presets by name")
            return deep_merge(load_preset_dict(stem, chain), data)
        return deep_merge(load_config_dict(_resolve_relative(parent, base_dir, source), chain), data)
    return deep_merge(load_preset_dict(parent, chain), data)


def _resolve_relative(ref: str, base_dir: Path, source: str) -> Path:
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"{source}: inherit {ref!r}: no such file {path}")
    return path


def load_preset_dict(name: str, _seen: tuple = ()) -> dict:
    """The raw (merged) mapping of a preset, following `inherit`."""
    fname = f"{name}.yaml"
    res = preset_dir().joinpath(fname)
    if not res.is_file():
        valid = preset_names()
        close = did_you_mean(name, valid, cutoff=0.5)
        hint = f" Did you mean '{close}'?" if close is not None else ""
        raise ConfigError(f"Unknown preset '{name}'.{hint} Available presets: {', '.join(valid)}.")
    chain = check_cycle(f"preset:{name}", f"preset {name}", tuple(_seen))
    data = read_yaml(res.read_text(encoding="utf-8"), f"preset {name}")
    return follow_inherit(data, f"preset {name}", None, chain)


def load_config_dict(path: str | Path, _seen: tuple = ()) -> dict:
    """The raw (merged) mapping of a user YAML file, following `inherit` (a preset name, or a path
    relative to this file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    chain = check_cycle(f"file:{path.resolve()}", str(path), tuple(_seen))
    data = read_yaml(path.read_text(encoding="utf-8"), str(path))
    return follow_inherit(data, str(path), path.parent, chain)
