"""The base of every method's hyperparameter dataclass: typed, range-checked fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..ranges import LOSS_PARAM_RANGES
from ..values import BadValue, coerce, kind_from_default


def coerce_param(key: str, value: Any, default: Any) -> Any:
    """``value`` read as the type of the field's ``default`` (lenient :func:`alphadpo_cli.values.coerce`:
    YAML gives "5e-2" as a string, Python callers may pass "false" or a one-element tensor)."""
    try:
        return coerce(value, *kind_from_default(default), lenient=True)
    except BadValue as exc:
        raise ValueError(f"parameter {key!r} must be {exc.expected}, got {exc.value!r}") from None


@dataclass
class LossParams:
    """Base: coerces every field to its default's type (numeric strings → float) and checks every
    numeric field against its documented range (:data:`alphadpo_cli.ranges.LOSS_PARAM_RANGES`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = coerce_param(f.name, getattr(self, f.name), f.default)
            setattr(self, f.name, value)
            rng = LOSS_PARAM_RANGES.get(f.name)
            if rng is not None and isinstance(value, float) and not rng.contains(value):
                raise ValueError(f"{type(self).__name__}.{f.name} = {value!r} is out of range: allowed {rng.describe()}")

    def _check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise ValueError(f"{type(self).__name__}.{key} must be one of {list(choices)}, got {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
