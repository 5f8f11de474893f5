"""The runs of a comparison: every method × its grid points × every seed, each with its resolved
config (resolved, and so checked, before any model loads) and its run directory
`<out>/runs/<method>[/<grid point>]/seed-<s>`."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import CompareOptions, GridAxis


@dataclass
class Run:
    method: str
    point: dict[str, Any]  # grid key -> value (only the axes that apply to the method)
    seed: int
    run_dir: Path
    config: Any = field(default=None, repr=False)

    @property
    def point_name(self) -> str:
        return point_name(self.point)

    @property
    def id(self) -> str:
        return f"{self.method}/{self.point_name}/seed-{self.seed}" if self.point else f"{self.method}/seed-{self.seed}"


def point_name(point: dict[str, Any]) -> str:
    """'alpha=0.05,gamma_beta_ratio=0.3' (the keys' last parts), '' for no grid point."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def points_for(method: str, axes: list[GridAxis]) -> list[dict[str, Any]]:
    """The grid points of one method: the product of the axes that apply to it ([{}] for none)."""
    mine = [a for a in axes if a.applies_to(method)]
    return [dict(zip([a.key for a in mine], values)) for values in itertools.product(*[a.values for a in mine])]


def plan_runs(o: CompareOptions, axes: list[GridAxis], seeds: list[int], out: Path,
              data_sets: list[str]) -> list[Run]:
    """Every run with its config; a bad key or value is a ConfigError naming the run's overrides."""
    from ..config import ConfigError, resolve_config

    runs = []
    for method in o.losses:
        for point in points_for(method, axes):
            for seed in seeds:
                run = Run(method, point, seed, Path())
                run.run_dir = out / "runs" / Path(run.id)
                sets = [*o.overrides, *data_sets, *(f"{k}={v}" for k, v in point.items()),
                        f"training.seed={seed}", f"training.output_dir={run.run_dir}"]
                try:
                    run.config = resolve_config(preset=o.preset, config_file=o.config_file, overrides=sets, loss=method)
                except ConfigError as exc:
                    raise ConfigError(f"run {run.id}: {exc}") from None
                runs.append(run)
    return runs


def chosen_runs(runs: list[Run], method: str, point: dict[str, Any]) -> list[Run]:
    """The runs (one per seed) of a method's chosen grid point."""
    return [r for r in runs if r.method == method and r.point == point]
