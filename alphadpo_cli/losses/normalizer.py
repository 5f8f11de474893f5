"""α-DPO's margin normaliser: z-scores the per-pair discrepancy g with running (or batch) statistics.

A trainer brackets each optimiser step with :meth:`MarginNormalizer.begin_step` and
:meth:`MarginNormalizer.end_step`; then the default statistics are those of whole optimiser steps
(every micro-batch of every process), whatever the number of processes and the accumulation. Called
outside a step, each call is a step of its own (what a stand-alone ``alpha_dpo_loss`` call gets).

:class:`MarginNormalizer` is a thin stateful holder around the pure functions of
:mod:`~alphadpo_cli.losses.normalizer_state` (``observe``, ``begin_step``, ``end_step``,
``statistics``, ``normalize`` over a frozen :class:`NormalizerState`): every number comes from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from . import normalizer_state as ns
from .normalizer_state import FEW_VALUES, NORMALIZER_MODES, NormalizerConfig, NormalizerState

__all__ = ["FEW_VALUES", "NORMALIZER_MODES", "MarginNormalizer", "NormalizerConfig", "NormalizerState",
           "resolve_normalizer"]


class MarginNormalizer:
    """Z-scores α-DPO's per-pair discrepancy ``g`` (the paper's M, eq. 11): ``z = (g − μ)/σ``.

    ``μ`` and ``σ`` are constants (no gradient flows into the statistics; if ``g`` carries a
    gradient, so does ``z`` through the numerator). Each process normalises its *own* ``g``; the
    statistics are the same on every process. What they are computed over depends on the mode and
    on whether the call is inside an optimiser step.

    **Inside an optimiser step** (between :meth:`begin_step` and :meth:`end_step`; the trainer
    brackets every step so): ``"ema"`` and ``"batch"`` normalise every micro-batch of the step,
    on every process, with the statistics as they stood when the step began, and (when updating is
    enabled: ``training`` and not inside :meth:`frozen`) pool its ``g``. :meth:`end_step`
    all-gathers the pool from every rank (every value, exactly; unequal counts are fine) and
    updates the statistics **once**, from the mean and unbiased std of the step's global batch.
    So step t is normalised with statistics of steps 1 … t−1: the same numbers whether the step
    ran as 1 process × batch 8, 1 × 2 × accumulation 4 or 2 processes × 2 × accumulation 2.

    *Why a one-step lag.* A step's statistics are known only once all its micro-batches have been
    through the forward, but each micro-batch is back-propagated before the next one runs (that is
    what accumulation is for); using the step's own statistics would take a second forward over
    the step, or holding every micro-batch's graph in memory. The margin is detached, a constant
    for the gradient, so it may be computed from statistics of the past; the EMA averages over
    ~1/(1−momentum) = 10 steps anyway, so one step more of lag changes it little.

    *Step 1* (no statistics yet): ``μ = 0, σ = ∞``, so ``z = 0`` and the margin is γ/β — SimPO's
    step. With the policy starting at the reference, g is rounding noise at step 1 anyway (z-scoring
    it would only amplify the noise).

    *A skipped step* (``end_step(update=False)``: the trainer's non-finite loss or gradient norm)
    leaves the statistics untouched, like the weights; a pool holding a non-finite g never updates
    them either (its loss was non-finite too).

    **Outside a step** (a stand-alone call, e.g. ``alpha_dpo_loss`` in someone else's trainer) each
    call is a step of its own and its batch is whole, so no lag is needed: ``"ema"`` (when
    updating) and ``"batch"`` (always) first update the statistics from the call's ``g``,
    all-gathered over the data-parallel group when ``torch.distributed`` is initialised with world
    size > 1 and ``gather=True`` (a no-op in one process), then normalise with them.

    Modes

    * ``"ema"`` (default): bias-corrected EMA of the mean and std. Raw accumulators start at 0
      and ``a ← m·a + (1−m)·stat``; the value used is ``a / (1 − m^t)`` after t updates, so
      after one update it is exactly that update's statistics. ``σ`` is floored at ``eps``.
      Updates: once per optimiser step from the step's global batch (inside steps), or once per
      call from the call's gathered batch (outside).
    * ``"batch"``: no memory: ``μ, σ`` are those of the last update alone (σ floored at
      ``eps``): inside steps the previous optimiser step's global batch; outside, the call's own
      gathered batch (stateless: ``training``/``frozen`` do not matter there).
    * ``"none"``: ``z = g``.
    * ``"official"``: the authors' code: updated at every call (micro-batch) from that call's
      ``g`` gathered over the processes, *before* normalising, inside a step or not; ``μ, σ``
      start at 0, ``μ ← m·μ + (1−m)·mean``, ``σ ← m·σ + (1−m)·std``, no bias correction, no
      epsilon: the first steps divide by (nearly) zero and can give inf/NaN. Its statistics
      depend on the per-device batch and the number of processes (one device at per-device
      batch 2 updates them from 2 values at a time); it warns once when an update sees fewer
      than :data:`FEW_VALUES` (8) values. For reproducing their runs only. Their code also
      updates during evaluation: the trainer does that for ``eval_updates_stats``
      (:class:`AlphaDPOParams`), on by default in the official mode.

    Before any update: ``"ema"`` and ``"batch"`` give ``μ = 0, σ = ∞`` (z = 0), ``"official"``
    ``μ = σ = 0``. std is always the unbiased (N−1) estimate, 0 for N == 1.

    ``eps`` (default 1e-3) floors sigma. At step 1 the policy equals the reference, so g is pure
    rounding noise (~1e-7 in fp32, ~1e-3 in bf16); z-scoring it with a tiny floor blows that
    noise up to O(1) margins, and two correct runs that round differently (precomputed vs online
    reference, one process vs several) then train differently. With the 1e-3 floor the adaptive
    margin stays ≈ 0 until the policy has really moved away from the reference; once std(g) is
    past ~1e-2 (within tens of steps) the floor no longer bites. It also guards against dividing
    by zero when every g in a batch is identical. Statistics are held in float64.

    ``state_dict()``/``load_state_dict()`` save and restore everything, an open step's pool
    included (checkpoint it with the trainer; the authors' code forgets it on resume).

    The maths is that of :mod:`alphadpo_cli.losses.normalizer_state` (pure functions of
    (state, g)); this class only owns a :class:`NormalizerState`, turns ``training``/:meth:`frozen`
    into their ``apply`` and ``gather``/:meth:`local` into their ``gather`` argument.
    """

    def __init__(
        self,
        mode: str = "ema",
        momentum: float = 0.9,
        eps: float = 1e-3,
        process_group: Any = None,
        gather: bool = True,
    ) -> None:
        self.config = NormalizerConfig(mode, momentum, eps)
        self.state = NormalizerState()
        self.process_group = process_group
        self.gather = gather
        self.training = True

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def momentum(self) -> float:
        return self.config.momentum

    @property
    def eps(self) -> float:
        return self.config.eps

    # -- train / eval -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "MarginNormalizer":
        self.training = bool(mode)
        return self

    def eval(self) -> "MarginNormalizer":
        return self.train(False)

    @contextlib.contextmanager
    def frozen(self) -> Iterator["MarginNormalizer"]:
        """Normalise without updating the statistics (or pooling) inside the block."""
        previous = self.training
        self.training = False
        try:
            yield self
        finally:
            self.training = previous

    @contextlib.contextmanager
    def local(self) -> Iterator["MarginNormalizer"]:
        """Inside the block, updates (and :meth:`end_step`) use the values given as they are, with no
        all-gather: for a caller that already holds the global batch on every rank (the trainer's
        evaluation, which scores the whole held-out split in each process)."""
        previous = self.gather
        self.gather = False
        try:
            yield self
        finally:
            self.gather = previous

    def _gather(self) -> ns.Gather:
        return functools.partial(ns.all_gather_values, group=self.process_group) if self.gather else ns.no_gather

    # -- optimiser steps ----------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        """Whether an optimiser step is open (:meth:`begin_step` without its :meth:`end_step`)."""
        return self.state.in_step

    def begin_step(self) -> None:
        """Open an optimiser step: until :meth:`end_step`, "ema" and "batch" normalise with the
        statistics as they stand now and pool the g of every call (see the class docstring).
        No effect on "official" (updated per call) and "none". A step left open (an exception
        inside the previous one) is discarded."""
        self.state = ns.begin_step(self.state)

    def end_step(self, update: bool = True) -> int:
        """Close the step: all-gather the pooled g of every rank (a collective: every rank calls it,
        with the same ``update``; no communication inside :meth:`local`) and, if ``update`` and every
        value is finite, update the statistics once from the mean and unbiased std of them all.

        Returns the number of values the update used (0: no update — ``update=False`` for a skipped
        step, nothing pooled (frozen), a non-finite value, or a mode without step statistics)."""
        self.state, used = ns.end_step(self.state, self.config, gather=self._gather(), apply=update)
        return used

    # -- statistics ---------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of statistic updates so far."""
        return self.state.steps

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mu, sigma) used for normalising now, as float64 0-d tensors (reading them needs no
        device sync; :attr:`mu` and :attr:`sigma` give them as floats). Before any update "ema"
        and "batch" give (0, ∞): z = 0."""
        return ns.statistics(self.state, self.config)

    @property
    def mu(self) -> float:
        return float(self.statistics()[0])

    @property
    def sigma(self) -> float:
        return float(self.statistics()[1])

    def gather_all(self, g: Tensor) -> Tensor:
        """All-gather a 1-D tensor over the process group (handles unequal sizes, empty ones too);
        the values as they are inside :meth:`local`."""
        return self._gather()(g)

    def observe(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Let this call's ``g`` reach the statistics as the mode says (pooled inside a step, an
        update of its own outside one, every call for "official"; nothing when frozen) and return
        the (μ, σ) to normalise it with."""
        self.state = ns.observe(self.state, g, self.config, gather=self._gather(), apply=self.training)
        return self.statistics()

    def __call__(self, g: Tensor) -> Tensor:
        """z of this call's ``g`` (after :meth:`observe`)."""
        return ns.normalize(g, *self.observe(g))

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        pending = torch.cat(s.pending) if s.pending else torch.zeros(0, dtype=torch.float64)

        def cpu(v: Tensor) -> Tensor:
            return v.detach().cpu().clone()

        return {
            "mode": self.mode, "momentum": self.momentum, "eps": self.eps, "steps": s.steps,
            "mu_acc": cpu(s.mu_acc), "sigma_acc": cpu(s.sigma_acc),
            "batch_mu": cpu(s.batch_mu), "batch_sigma": cpu(s.batch_sigma),
            "in_step": s.in_step, "pending": cpu(pending), "warned_few": s.warned_few,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (states saved before steps were pooled, without
        ``in_step``/``pending``, load as "between steps")."""
        if state["mode"] != self.mode:
            raise ValueError(f"normalizer state is for mode {state['mode']!r}, this normalizer is {self.mode!r}")
        if float(state["momentum"]) != self.momentum:
            raise ValueError(f"normalizer state has momentum {state['momentum']}, this normalizer {self.momentum}")
        self.config = dataclasses.replace(self.config, eps=float(state["eps"]))

        def t(v: Any) -> Tensor:
            return torch.as_tensor(v, dtype=torch.float64).detach().clone()

        pending = t(state.get("pending", [])).reshape(-1)
        self.state = NormalizerState(
            steps=int(state["steps"]), mu_acc=t(state["mu_acc"]), sigma_acc=t(state["sigma_acc"]),
            batch_mu=t(state["batch_mu"]), batch_sigma=t(state["batch_sigma"]),
            in_step=bool(state.get("in_step", False)), pending=(pending,) if pending.numel() else (),
            device=self.state.device, warned_few=bool(state.get("warned_few", False)),
        )

    def __repr__(self) -> str:
        return (
            f"MarginNormalizer(mode={self.mode!r}, momentum={self.momentum}, eps={self.eps}, "
            f"steps={self.steps}, training={self.training}, in_step={self.in_step})"
        )


def resolve_normalizer(normalization: str | None, normalizer: MarginNormalizer | None) -> MarginNormalizer:
    """Which normaliser a loss call uses.

    * ``normalization == "none"`` → identity (the ablation wins over any normaliser given);
    * no normaliser given → a fresh, per-process (no communication) normaliser of the
      requested mode, called outside a step, i.e. the call is a step of its own: "ema" and
      "batch" z-score with this batch's own statistics (σ floored at 1e-3), "official" does the
      authors' first update (mu = 0.1·mean, sigma = 0.1·std); ``normalization=None`` means "batch";
    * otherwise the given one, whose mode must match ``normalization`` (None: any mode).
    """
    if normalization == "none":
        return MarginNormalizer("none")
    if normalizer is None:
        return MarginNormalizer(normalization or "batch", gather=False)
    if normalization is not None and normalizer.mode != normalization:
        raise ValueError(
            f"params ask for normalization={normalization!r} but the MarginNormalizer passed is "
            f"mode={normalizer.mode!r}; build it with make_normalizer(name, params)"
        )
    return normalizer
