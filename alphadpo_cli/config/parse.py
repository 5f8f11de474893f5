"""Reading one value of a config: numbers the way the authors' YAML writes them, a field's type,
and the "did you mean" hint for a misspelled key."""

from __future__ import annotations

from typing import Any

import yaml

from ..values import BadValue, coerce, did_you_mean, kind_from_annotation, parse_number
from .errors import ConfigError


def parse_scalar(text: Any) -> Any:
    """YAML 1.1 reads `5e-2` as a string (the authors' configs trip on it); read numbers robustly."""
    if not isinstance(text, str):
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        number = parse_number(value)
        return value if number is None else number
    return value


def coerce_field(value: Any, annotation: Any, where: str) -> Any:
    """`value` read as the field's annotation says (`values.coerce`, strict), or a ConfigError."""
    try:
        return coerce(value, *kind_from_annotation(annotation))
    except BadValue as exc:
        raise ConfigError(f"{where}: null is not allowed here" if exc.value is None else f"{where}: {exc}") from None


def suggest(key: str, valid: list[str]) -> str:
    """" Did you mean 'x'?" for a near miss, else the list of valid keys."""
    close = did_you_mean(key, valid, cutoff=0.5)
    return f" Did you mean '{close}'?" if close is not None else f" Valid keys: {', '.join(sorted(valid))}."


def fmt(value: Any) -> str:
    """A value as an error message shows it (None as YAML's null)."""
    return "null" if value is None else repr(value)
