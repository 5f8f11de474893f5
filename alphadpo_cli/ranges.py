"""Allowed ranges of numeric settings, shared by the config (alphadpo_cli.config) and the loss
parameters (alphadpo_cli.losses). Pure Python: importing it costs nothing (`--help` stays instant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting: [lo, hi] with open ends where asked, plus `also`
    (special values such as max_steps = -1) and None where `optional`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()
    optional: bool = False
    note: str = ""

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self) -> str:
        def num(x):
            return f"{x:g}" if isinstance(x, float) else str(x)

        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        else:
            text = "a finite number"
        extra = [num(v) for v in self.also] + (["null"] if self.optional else [])
        if extra:
            text += f", or {' or '.join(extra)}"
        return text + (f" ({self.note})" if self.note else "")

    def outside(self, integer: bool = False) -> list:
        """Values just out of range (the tests try each of them)."""
        out = []
        if self.lo is not None:
            out += ([self.lo] if self.lo_open else []) + [self.lo - 1]
        if self.hi is not None:
            out += [self.hi] if self.hi_open else [self.hi + 1]
        if not integer:
            out += [float("nan"), float("inf")] if self.hi is None else [float("nan")]
        return [v for v in dict.fromkeys(out) if v not in self.also]


#: Documented ranges of the loss hyperparameters, by field name, for every method that has the
#: field: every params dataclass of `alphadpo_cli.losses` checks its numeric fields against it, so
#: the library refuses them too, and the config resolution names the key (loss.params.<key>).
LOSS_PARAM_RANGES: dict[str, Range] = {
    "beta": Range(lo=0.0, lo_open=True),
    "gamma_beta_ratio": Range(lo=0.0),
    "alpha": Range(lo=0.0),
    "label_smoothing": Range(lo=0.0, hi=0.5, hi_open=True),
    "normalizer_momentum": Range(lo=0.0, hi=1.0, hi_open=True),
    "sigma_floor": Range(lo=0.0),
    "sft_weight": Range(lo=0.0),
    "tau": Range(lo=0.0, lo_open=True),
    "nll_weight": Range(lo=0.0),
    "lambda_w": Range(lo=0.0, lo_open=True),
    "lambda_l": Range(lo=0.0, lo_open=True),
    "lam": Range(lo=0.0),
}
