"""The margin normaliser's maths as pure functions of (state, g): no hidden state, no sticky flags.

A :class:`NormalizerState` (frozen: tensors and ints) holds everything the statistics depend on;
every function here takes one and returns a new one. What varies by mode is one row of
:data:`MODE_RULES` (how a call's g reaches the statistics, how a batch's mean and std fold into
them, what μ, σ are read from them), never an if-chain. What the stateful world used to hold in
flags is an argument: ``gather`` (the cross-process all-gather, :func:`no_gather` in one process or
for values that are already global) and ``apply`` (update or not: training vs evaluation, a
skipped step). :class:`~alphadpo_cli.losses.normalizer.MarginNormalizer` is the thin holder a
trainer keeps (the state, ``state_dict``, ``.mu``/``.sigma``); the semantics of each mode, the
one-step lag and the σ floor are documented there.

    cfg = NormalizerConfig("ema")
    state = begin_step(NormalizerState())
    state = observe(state, g, cfg, gather=no_gather, apply=True)   # each micro-batch: pooled
    z = normalize(g, *statistics(state, cfg))                      # the lagged statistics
    state, used = end_step(state, cfg, gather=no_gather, apply=True)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FEW_VALUES", "NORMALIZER_MODES", "MODE_RULES", "Gather", "ModeRule", "NormalizerConfig", "NormalizerState",
    "all_gather_values", "begin_step", "end_step", "mean_std", "no_gather", "normalize", "observe", "statistics",
    "update",
]

NORMALIZER_MODES = ("ema", "batch", "none", "official")

#: The "official" mode warns (once per normaliser) when an update sees fewer values than this.
FEW_VALUES = 8

#: ``gather(local_values) -> the values of every process`` (1-D); a collective when it communicates.
Gather = Callable[[Tensor], Tensor]


def _f64(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float64)


@dataclass(frozen=True)
class NormalizerConfig:
    """The mode and its constants: EMA ``momentum`` in [0, 1), σ floor ``eps`` >= 0."""

    mode: str = "ema"
    momentum: float = 0.9
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZER_MODES:
            raise ValueError(f"unknown normalizer mode {self.mode!r}; valid: {list(NORMALIZER_MODES)}")
        momentum, eps = float(self.momentum), float(self.eps)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "eps", eps)


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, not element-wise
class NormalizerState:
    """Everything the statistics depend on (float64 0-d tensors):

    * ``steps``: statistic updates so far; ``mu_acc``/``sigma_acc``: the raw EMA accumulators
      ("ema") or μ, σ themselves ("official"); ``batch_mu``/``batch_sigma``: the last update's
      statistics ("batch");
    * ``in_step``/``pending``: an open optimiser step and the g it pooled so far ("ema", "batch");
    * ``device``: where the last g lived (an empty pool is gathered there);
    * ``warned_few``: the "official" mode's few-values warning was given.
    """

    steps: int = 0
    mu_acc: Tensor = field(default_factory=lambda: _f64(0.0))
    sigma_acc: Tensor = field(default_factory=lambda: _f64(0.0))
    batch_mu: Tensor = field(default_factory=lambda: _f64(0.0))
    batch_sigma: Tensor = field(default_factory=lambda: _f64(1.0))
    in_step: bool = False
    pending: tuple[Tensor, ...] = ()
    device: torch.device | None = None
    warned_few: bool = False


def mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased (N−1) std in float64; std is 0 when N == 1."""
    x = x.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n == 0:
        raise ValueError("cannot normalise an empty batch of margins")
    mean = x.mean()
    std = x.std(unbiased=True) if n > 1 else torch.zeros((), dtype=torch.float64, device=x.device)
    return mean, std


# -- the rows of the mode table -------------------------------------------------------------------


def _fold_accumulators(state: NormalizerState, mean: Tensor, std: Tensor, cfg: NormalizerConfig) -> NormalizerState:
    """``a ← m·a + (1−m)·stat`` for μ and σ ("ema": raw accumulators; "official": the values)."""
    m = cfg.momentum
    return dataclasses.replace(
        state, steps=state.steps + 1,
        mu_acc=m * state.mu_acc.to(mean.device) + (1.0 - m) * mean,
        sigma_acc=m * state.sigma_acc.to(mean.device) + (1.0 - m) * std,
    )


def _fold_last(state: NormalizerState, mean: Tensor, std: Tensor, cfg: NormalizerConfig) -> NormalizerState:
    """The batch's own statistics replace the last ones (σ floored at eps)."""
    return dataclasses.replace(state, steps=state.steps + 1, batch_mu=mean, batch_sigma=std.clamp_min(cfg.eps))


def _no_fold(state: NormalizerState, mean: Tensor, std: Tensor, cfg: NormalizerConfig) -> NormalizerState:
    return state


def _stats_bias_corrected(state: NormalizerState, cfg: NormalizerConfig) -> tuple[Tensor, Tensor]:
    if state.steps == 0:
        return _f64(0.0), _f64(math.inf)
    correction = 1.0 - cfg.momentum ** state.steps
    return state.mu_acc / correction, (state.sigma_acc / correction).clamp_min(cfg.eps)


def _stats_last(state: NormalizerState, cfg: NormalizerConfig) -> tuple[Tensor, Tensor]:
    if state.steps == 0:
        return _f64(0.0), _f64(math.inf)
    return state.batch_mu, state.batch_sigma


def _stats_raw(state: NormalizerState, cfg: NormalizerConfig) -> tuple[Tensor, Tensor]:
    return state.mu_acc, state.sigma_acc


def _stats_identity(state: NormalizerState, cfg: NormalizerConfig) -> tuple[Tensor, Tensor]:
    return _f64(0.0), _f64(1.0)


def _pool(state: NormalizerState, g: Tensor, apply: bool) -> NormalizerState:
    if not apply:
        return state
    return dataclasses.replace(state, pending=(*state.pending, g.detach().reshape(-1).to(torch.float64)))


def _observe_lagged(state, g, cfg, gather, apply):  # ema
    """Inside a step: pool (when applying); outside: a step of its own, updated when applying."""
    return _pool(state, g, apply) if state.in_step else update(state, g, cfg, gather=gather, apply=apply)


def _observe_lagged_stateless(state, g, cfg, gather, apply):  # batch
    """Inside a step: pool (when applying); outside: always the call's own statistics."""
    return _pool(state, g, apply) if state.in_step else update(state, g, cfg, gather=gather, apply=True)


def _observe_every_call(state, g, cfg, gather, apply):  # official
    """Every call (micro-batch) updates before it is normalised, inside a step or not."""
    return update(state, g, cfg, gather=gather, apply=apply)


def _observe_nothing(state, g, cfg, gather, apply):  # none
    return state


@dataclass(frozen=True)
class ModeRule:
    """One mode: ``observe(state, g, cfg, gather, apply)`` (a call's effect before normalising),
    ``fold(state, mean, std, cfg)`` (one update), ``stats(state, cfg) -> (μ, σ)``, whether an
    optimiser step's pooled g update it at :func:`end_step` (``pools``) and whether an update from
    fewer than :data:`FEW_VALUES` values warns (``warns_few``)."""

    observe: Callable[..., NormalizerState]
    fold: Callable[[NormalizerState, Tensor, Tensor, NormalizerConfig], NormalizerState]
    stats: Callable[[NormalizerState, NormalizerConfig], tuple[Tensor, Tensor]]
    pools: bool = False
    warns_few: bool = False


MODE_RULES: dict[str, ModeRule] = {
    "ema": ModeRule(_observe_lagged, _fold_accumulators, _stats_bias_corrected, pools=True),
    "batch": ModeRule(_observe_lagged_stateless, _fold_last, _stats_last, pools=True),
    "official": ModeRule(_observe_every_call, _fold_accumulators, _stats_raw, warns_few=True),
    "none": ModeRule(_observe_nothing, _no_fold, _stats_identity),
}


# -- the functions --------------------------------------------------------------------------------


def no_gather(g: Tensor) -> Tensor:
    """The values as they are (one process, or values every process already holds)."""
    return g.detach().reshape(-1)


def all_gather_values(g: Tensor, group=None) -> Tensor:
    """All-gather a 1-D tensor over ``group`` (unequal sizes and empty ones are fine); the values
    as they are when ``torch.distributed`` is not initialised or the world is one process."""
    g = g.detach().reshape(-1)
    if not (dist.is_available() and dist.is_initialized()):
        return g
    world = dist.get_world_size(group)
    if world <= 1:
        return g
    n = torch.tensor([g.numel()], dtype=torch.long, device=g.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:
        return g
    padded = g.new_zeros(max(counts))
    padded[: g.numel()] = g
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([b[:c] for b, c in zip(buffers, counts)])


def statistics(state: NormalizerState, cfg: NormalizerConfig) -> tuple[Tensor, Tensor]:
    """(μ, σ) to normalise with now, float64 0-d tensors: "ema"/"batch" (0, ∞) before any update
    (z = 0), "official" its raw values (0, 0 at first), "none" (0, 1)."""
    return MODE_RULES[cfg.mode].stats(state, cfg)


def normalize(g: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """``z = (g − μ)/σ``, computed in float64 and returned in g's dtype (gradient through g only)."""
    z = (g.to(torch.float64) - mu.to(device=g.device)) / sigma.to(device=g.device)
    return z.to(g.dtype)


def fold_values(state: NormalizerState, values: Tensor, cfg: NormalizerConfig) -> NormalizerState:
    """One statistics update from ``values`` (already gathered): their mean and unbiased std folded
    in by the mode's rule (warning once in "official" when there are fewer than :data:`FEW_VALUES`)."""
    rule = MODE_RULES[cfg.mode]
    if rule.warns_few and values.numel() < FEW_VALUES and not state.warned_few:
        _warn_few(int(values.numel()))
        state = dataclasses.replace(state, warned_few=True)
    mean, std = mean_std(values)
    return rule.fold(state, mean, std, cfg)


def update(
    state: NormalizerState, g: Tensor, cfg: NormalizerConfig, *, gather: Gather = no_gather, apply: bool = True
) -> NormalizerState:
    """One statistics update from the call's ``g`` gathered with ``gather``; ``apply=False``: the
    state as it is (and no communication)."""
    if not apply:
        return state
    return fold_values(state, gather(g), cfg)


def observe(
    state: NormalizerState, g: Tensor, cfg: NormalizerConfig, *, gather: Gather = no_gather, apply: bool = True
) -> NormalizerState:
    """What one call's ``g`` does to the statistics before it is normalised (the mode's rule):
    pooled inside a step ("ema", "batch"), an update of its own outside one, every call ("official")."""
    if cfg.mode != "none":
        state = dataclasses.replace(state, device=g.device)
    return MODE_RULES[cfg.mode].observe(state, g, cfg, gather, apply)


def begin_step(state: NormalizerState) -> NormalizerState:
    """Open an optimiser step (a step left open is discarded)."""
    return dataclasses.replace(state, in_step=True, pending=())


def end_step(
    state: NormalizerState, cfg: NormalizerConfig, *, gather: Gather = no_gather, apply: bool = True
) -> tuple[NormalizerState, int]:
    """Close the step: gather the pooled g of every process (a collective for pooling modes, with
    or without ``apply``) and, if ``apply`` and every value is finite, update once from them all.
    Returns the new state and the number of values the update used (0: none)."""
    if not state.in_step:
        raise RuntimeError("MarginNormalizer.end_step() without begin_step()")
    pool = state.pending
    state = dataclasses.replace(state, in_step=False, pending=())
    if not MODE_RULES[cfg.mode].pools:
        return state, 0
    device = pool[0].device if pool else (state.device or torch.device("cpu"))
    local = torch.cat(pool) if pool else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = gather(local)
    if not apply or gathered.numel() == 0 or not bool(torch.isfinite(gathered).all()):
        return state, 0
    return fold_values(state, gathered, cfg), int(gathered.numel())


_HERE = str(Path(__file__).resolve().parent)


def _warn_few(n: int) -> None:
    # attributed to the first caller outside alphadpo_cli.losses
    level, frame = 1, inspect.currentframe()
    while frame is not None and str(Path(frame.f_code.co_filename).resolve().parent) == _HERE:
        level, frame = level + 1, frame.f_back
    del frame
    warnings.warn(
        f"α-DPO 'official' margin normaliser: μ, σ updated from {n} values (fewer than "
        f"{FEW_VALUES}). As in the authors' code, each micro-batch's g, gathered over the processes, "
        "updates them, so a std over so few values is noisy and the α-DPO trained depends on the "
        "per-device batch size and the number of processes. The default 'ema' normaliser updates "
        "once per optimiser step from the step's whole global batch.",
        UserWarning,
        stacklevel=level,
    )
