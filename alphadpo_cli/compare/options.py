"""What `alphadpo compare` is asked (`CompareOptions`, shared by the command and the Python API),
and the checks that turn a mistake into one `ConfigError` before any model loads: the methods, the
grid (`--grid KEY=V1,V2,...`, the settings it sweeps), the seeds, the baseline method of the paired
differences and the share of training prompts carved off for validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import ConfigError
from ..config.parse import parse_scalar
from ..config.resolve import apply_override

#: Keys a grid may not sweep: the comparison sets them itself (seeds, run directories, the data it carves).
RESERVED = {"training.seed": "use --seeds", "training.output_dir": "the comparison places every run",
            "data.dataset": "give it with --set", "data.train_split": "give it with --set",
            "data.eval_split": "give it with --set", "data.eval_dataset": "give it with --set"}


@dataclass(frozen=True)
class CompareOptions:
    """Methods × grid points × seeds, each an ordinary `train` run under `output_dir/runs/`.

    `grid`: "KEY=V1,V2,..." strings (any config key; an optional "METHOD:" prefix limits it to one
    method; a `loss.params.X` key applies to the methods that have parameter X). `seeds`: a count
    (seeds training.seed, +1, ...) or the seeds themselves. `validation`: the share of the training
    prompts carved off to choose a grid's setting on (only with a grid). `baseline_method`: the
    method every other one is compared with, prompt by prompt; by default the first method is
    compared with each of the others. `reward`: the reward judge of the test answers (none: held-out
    preference accuracy only)."""

    preset: str | None = None
    config_file: str | None = None
    losses: tuple[str, ...] = ("alpha_dpo", "simpo", "dpo")
    grid: tuple[str, ...] = ()
    seeds: int | tuple[int, ...] = 1
    overrides: tuple[str, ...] = ()
    output_dir: str = "outputs/compare"
    reward: str | None = None
    baseline_method: str | None = None
    validation: float = 0.2
    max_new_tokens: int | None = None
    batch_size: int = 16
    overwrite: bool = False
    quiet: bool = False

    def identity(self) -> dict:
        """What the comparison's results depend on (not where they go, nor how they are shown)."""
        d = dataclasses.asdict(self)
        for k in ("output_dir", "overwrite", "quiet", "batch_size"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class GridAxis:
    """One swept key: its values, and the one method it is limited to (None: every method it fits)."""

    key: str
    values: tuple[Any, ...]
    method: str | None = None

    @property
    def label(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    def applies_to(self, method: str) -> bool:
        if self.method is not None:
            return self.method == method
        if self.key.startswith("loss.params."):
            from ..losses import get_loss

            params = {f.name for f in dataclasses.fields(get_loss(method).params_cls)}
            return self.key.split(".", 2)[2] in params
        return True


def parse_grid(item: str) -> GridAxis:
    """'[METHOD:]KEY=V1,V2,...' → GridAxis; every mistake a ConfigError naming the item."""
    method = None
    head, sep, values = item.partition("=")
    if not sep or not values.strip():
        raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. loss.params.alpha=0.01,0.05,0.1,0.2")
    if ":" in head:
        method, head = (s.strip() for s in head.split(":", 1))
    key = head.strip()
    apply_override({}, f"{key}=0")  # a known key (loss.params.* are checked per method later)
    if key in RESERVED:
        raise ConfigError(f"--grid {item!r}: {key} cannot be swept ({RESERVED[key]})")
    parsed = tuple(parse_scalar(v.strip()) for v in values.split(",") if v.strip())
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"--grid {item!r}: a value is given twice")
    return GridAxis(key, parsed, method)


def seed_list(seeds: int | Sequence[int], first: int) -> list[int]:
    """A count (first, first+1, ...) or the seeds themselves, distinct."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, not {seeds}")
        return [first + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"--seeds: give a count or distinct seeds, not {list(seeds)}")
    return out


def parse_seeds(text: str) -> int | tuple[int, ...]:
    """--seeds: '3' (a count) or '1,7,9' (the seeds)."""
    try:
        parts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: a count (3) or comma-separated seeds (1,7,9)") from None
    if "," not in text and len(parts) == 1:
        return parts[0]
    return tuple(parts)


def check_options(o: CompareOptions) -> list[GridAxis]:
    """Every check that needs no model; returns the parsed grid."""
    from ..losses import get_loss

    if not o.preset and not o.config_file:
        raise ConfigError("give --preset NAME or --config FILE (see `alphadpo presets list`)")
    if not o.losses:
        raise ConfigError("--loss: give one or more methods, e.g. alpha_dpo,simpo,dpo")
    if len(set(o.losses)) != len(o.losses):
        raise ConfigError(f"--loss names a method twice: {','.join(o.losses)}")
    for name in o.losses:
        get_loss(name)  # UnknownLossError lists the valid ones
    if o.baseline_method is not None and o.baseline_method not in o.losses:
        raise ConfigError(f"--baseline-method {o.baseline_method!r} is not among --loss {','.join(o.losses)}")
    if not 0.0 < o.validation <= 0.5:
        raise ConfigError(f"--validation must be in (0, 0.5] (a share of the training prompts), not {o.validation}")
    if o.batch_size < 1 or (o.max_new_tokens is not None and o.max_new_tokens < 1):
        raise ConfigError("--batch-size and --max-new-tokens must be >= 1")
    axes = [parse_grid(g) for g in o.grid]
    keys = [(a.method, a.key) for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError("--grid sweeps the same key twice: give its values in one --grid")
    for a in axes:
        if a.method is not None and a.method not in o.losses:
            raise ConfigError(f"--grid {a.method}:{a.key}: {a.method!r} is not among --loss {','.join(o.losses)}")
        if not any(a.applies_to(m) for m in o.losses):
            raise ConfigError(f"--grid {a.key}: no method among {','.join(o.losses)} has this parameter")
    return axes


__all__ = ["CompareOptions", "GridAxis", "parse_grid", "parse_seeds", "seed_list", "check_options", "RESERVED"]
