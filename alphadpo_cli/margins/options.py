"""What `alphadpo margins` is asked to inspect: the normalisation names, the policies, and
:class:`InspectOptions`, checked before any model is loaded.

Light on purpose (the standard library and the config only): the command line imports it while
building its options, and `alphadpo --help` must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import ConfigError

#: How g is z-scored (see :mod:`alphadpo_cli.margins`); the command's --norm choices.
NORM_MODES = ("auto", "dataset", "batch", "ema", "official", "none", "run")


@dataclass
class PolicySpec:
    """A policy to inspect: a LoRA adapter directory or a full model (directory or hub id)."""

    path: str
    kind: str = "adapter"  # adapter | full | base
    label: str | None = None


def parse_labelled(value: str) -> tuple[str | None, str]:
    """"LABEL=PATH" or "PATH" (a PATH that exists is never split)."""
    if "=" in value and not Path(value).expanduser().exists():
        label, _, path = value.partition("=")
        if label and path:
            return label, path
    return None, value


@dataclass
class InspectOptions:
    """Everything :func:`~alphadpo_cli.margins.inspect_margins` needs besides its progress and log hooks.

    Config: ``preset`` if given, else the run's config.yaml (``run_dir``, or the first policy if it
    is a training output directory), else the defaults; then ``loss``, ``overrides``
    (``--set KEY=VALUE``), ``model`` and ``data``. ``split``: default the config's eval split,
    falling back to its train split when the data has none. ``max_samples``: default the config's
    limit for the split. ``alphas`` / ``gammas``: one series per value (one policy only).
    ``norm`` / ``norm_batch``: see the package docstring (``norm_batch`` default: the training
    global batch for ``ema``, whose statistics training updates once per optimiser step, else the
    per-device batch). ``batch_size``: scoring batch (default: the config's eval batch size).
    ``use_reference_cache`` / ``save_reference_cache``: read / write the reference log-probs cache.
    """

    data: str | None = None
    model: str | None = None
    policies: Sequence[PolicySpec] = ()
    run_dir: str | Path | None = None
    preset: str | None = None
    loss: str | None = None
    overrides: Sequence[str] = ()
    split: str | None = None
    max_samples: int | None = None
    alphas: Sequence[float] | None = None
    gammas: Sequence[float] | None = None
    norm: str = "auto"
    norm_batch: int | None = None
    batch_size: int | None = None
    device: object = None  # str | torch.device | None
    use_reference_cache: bool = True
    save_reference_cache: bool = True

    def __post_init__(self) -> None:
        self.policies = tuple(self.policies)
        self.overrides = tuple(self.overrides)
        self.alphas = list(self.alphas) if self.alphas else None
        self.gammas = list(self.gammas) if self.gammas else None
        if not self.data:
            raise ConfigError("give --data: the preference pairs to score")
        if self.norm not in NORM_MODES:
            raise ConfigError(f"unknown normalisation {self.norm!r}; choose one of {', '.join(NORM_MODES)}")
        if self.several_policies and self.sweeps:
            raise ConfigError(
                "with several policies each one is a curve: give at most one --alpha / --gamma value "
                "(or one policy and a list of values)"
            )

    @property
    def several_policies(self) -> bool:
        return len(self.policies) > 1

    @property
    def sweeps(self) -> bool:
        """Whether several α or several γ/β values are asked for (one series each)."""
        return bool(self.alphas and len(self.alphas) > 1) or bool(self.gammas and len(self.gammas) > 1)
