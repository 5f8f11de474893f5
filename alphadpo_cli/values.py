"""Reading typed values, and "did you mean" hints: the one copy the config and the losses share.

* :func:`coerce` turns a value from YAML, ``--set`` or a Python caller into the kind a setting
  declares (``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"list"``, ``"dict"`` or ``"any"``).
  :func:`kind_from_annotation` reads the kind of a config field (``alphadpo_cli.config``),
  :func:`kind_from_default` that of a loss parameter (``alphadpo_cli.losses``). A value that does not
  fit raises :class:`BadValue`, which says what was expected; each caller words the message with
  where the value came from (``ConfigError`` for the config, ``ValueError`` for loss parameters).
* :func:`did_you_mean` is the closest valid name to a misspelt one, or None.

Pure Python (no torch, nothing from the package): importing it costs nothing.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable

__all__ = ["BadValue", "NUMBER", "parse_number", "coerce", "kind_from_annotation", "kind_from_default", "did_you_mean"]

#: A number written as text: "3", "-2.5", ".5", "5e-2" (YAML 1.1 reads "5e-2" as a string).
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

KINDS = ("int", "float", "bool", "str", "list", "dict", "any")
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "list": "a list", "dict": "a mapping", "any": "a value"}

_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class BadValue(ValueError):
    """``value`` is not what the setting takes. ``expected`` is a phrase: "an integer", "a number",
    "true or false", "a boolean", "a string", "a list", "a mapping", "a value", "finite". ``str()`` reads
    "expected <expected>, got <value!r>"."""

    def __init__(self, value: Any, expected: str) -> None:
        super().__init__(f"expected {expected}, got {value!r}")
        self.value = value
        self.expected = expected


def parse_number(text: str) -> float | None:
    """``text`` as a float if it is a plain number (:data:`NUMBER`, surrounding spaces allowed), else None."""
    return float(text) if NUMBER.match(text.strip()) else None


def coerce(value: Any, kind: str, nullable: bool = False, *, lenient: bool = False) -> Any:
    """``value`` as a ``kind`` (:data:`KINDS`), or :class:`BadValue`.

    ``None`` passes where ``nullable``; otherwise it is refused (``BadValue.value is None``).

    Strict reading (the default; the config's files and ``--set``):

    * int: a bool is refused; an integral float (or number text, "3" or "3.0") becomes an int;
    * float: an int or a float, or number text (:data:`NUMBER`); a bool is refused;
    * bool: only True or False ("true or false");
    * str: anything else is turned into its ``str()``;
    * list: a non-list becomes the stripped, non-empty items of its comma-separated text;
    * dict: must be a mapping; any: as it is.

    ``lenient`` reading (loss parameters, which also come from Python callers):

    * float: also any text ``float()`` reads (" 10 ", "nan") and a one-element tensor (anything with
      ``numel() == 1`` and ``item()``); the result must be finite ("finite");
    * bool: also "true"/"yes"/"on"/"1", "false"/"no"/"off"/"0" (any case) and the numbers 0 and 1
      ("a boolean");
    * str: must already be a string; the other kinds read as in the strict mode.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {list(KINDS)}")
    if isinstance(value, str) and kind in ("int", "float") and not lenient:
        number = parse_number(value)
        value = value if number is None else number
    if value is None:
        if nullable:
            return None
        raise BadValue(None, "a boolean" if kind == "bool" and lenient else _EXPECTED[kind])
    if kind == "int":
        return _to_int(value)
    if kind == "float":
        return _to_float(value, lenient)
    if kind == "bool":
        return _to_bool(value, lenient)
    if kind == "str" and not isinstance(value, str):
        if lenient:
            raise BadValue(value, "a string")
        return str(value)
    if kind == "list" and not isinstance(value, list):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    if kind == "dict" and not isinstance(value, dict):
        raise BadValue(value, "a mapping")
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(value, "an integer")
    return value


def _to_float(value: Any, lenient: bool) -> float:
    if isinstance(value, bool):
        raise BadValue(value, "a number")
    if lenient and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadValue(value, "a number") from None
    if lenient and hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        value = value.item()  # a one-element tensor (tensor(True) reads as 1.0)
    if not isinstance(value, (int, float)):
        raise BadValue(value, "a number")
    value = float(value)
    if lenient and not math.isfinite(value):
        raise BadValue(value, "finite")
    return value


def _to_bool(value: Any, lenient: bool) -> bool:
    if isinstance(value, bool):
        return value
    if not lenient:
        raise BadValue(value, "true or false")
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE_WORDS:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise BadValue(value, "a boolean")


def kind_from_annotation(annotation: Any) -> tuple[str, bool]:
    """(kind, nullable) of a dataclass field's annotation, as text ("int | None", "list", "Any")."""
    ann = str(annotation)
    nullable = "None" in ann or ann == "Any"
    for kind in ("int", "float", "bool", "str"):
        if ann.startswith(kind):
            return kind, nullable
    if ann in ("list", "dict"):
        return ann, nullable
    return "any", nullable


def kind_from_default(default: Any) -> tuple[str, bool]:
    """(kind, nullable) of a loss parameter, from its default: a bool, a number (read as a float) or
    a string takes only that; any other default (None, say) takes any value, None included."""
    if isinstance(default, bool):
        return "bool", False
    if isinstance(default, (int, float)):
        return "float", False
    if isinstance(default, str):
        return "str", False
    return "any", True


def did_you_mean(word: Any, choices: Iterable[Any], *, cutoff: float = 0.6) -> Any | None:
    """The choice closest to ``word`` (:func:`difflib.get_close_matches`, similarity ≥ ``cutoff``),
    or None. ``word`` is compared as ``str(word)``; callers word the hint themselves."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None
