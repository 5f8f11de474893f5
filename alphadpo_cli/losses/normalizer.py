"""α-DPO's margin normaliser: z-scores the per-pair discrepancy g with running (or batch) statistics.

A trainer brackets each optimiser step with :meth:`MarginNormalizer.begin_step` and
:meth:`MarginNormalizer.end_step`; then the default statistics are those of whole optimiser steps
(every micro-batch of every process), whatever the number of processes and the accumulation. Called
outside a step, each call is a step of its own (what a stand-alone ``alpha_dpo_loss`` call gets).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FEW_VALUES", "NORMALIZER_MODES", "MarginNormalizer", "resolve_normalizer"]

NORMALIZER_MODES = ("ema", "batch", "none", "official")

#: The "official" mode warns (once per normaliser) when an update sees fewer values than this.
FEW_VALUES = 8


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased (N−1) std in float64; std is 0 when N == 1."""
    x = x.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n == 0:
        raise ValueError("cannot normalise an empty batch of margins")
    mean = x.mean()
    std = x.std(unbiased=True) if n > 1 else torch.zeros((), dtype=torch.float64, device=x.device)
    return mean, std


def _scalar(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float64)


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
    """

    def __init__(
        self,
        mode: str = "ema",
        momentum: float = 0.9,
        eps: float = 1e-3,
        process_group: Any = None,
        gather: bool = True,
    ) -> None:
        if mode not in NORMALIZER_MODES:
            raise ValueError(f"unknown normalizer mode {mode!r}; valid: {list(NORMALIZER_MODES)}")
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        eps = float(eps)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.mode = mode
        self.momentum = momentum
        self.eps = eps
        self.process_group = process_group
        self.gather = gather
        self.training = True
        self._steps = 0
        # raw accumulators (ema) / the values themselves (official)
        self._mu_acc = torch.zeros((), dtype=torch.float64)
        self._sigma_acc = torch.zeros((), dtype=torch.float64)
        # statistics of the last update (batch mode's mu/sigma)
        self._batch_mu = torch.zeros((), dtype=torch.float64)
        self._batch_sigma = torch.ones((), dtype=torch.float64)
        # an open optimiser step: its pooled g (ema, batch)
        self._in_step = False
        self._pool: list[Tensor] = []
        self._device: torch.device | None = None  # where g lives (an empty pool is gathered there)
        self._warned_few = False

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

    # -- optimiser steps ----------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        """Whether an optimiser step is open (:meth:`begin_step` without its :meth:`end_step`)."""
        return self._in_step

    def begin_step(self) -> None:
        """Open an optimiser step: until :meth:`end_step`, "ema" and "batch" normalise with the
        statistics as they stand now and pool the g of every call (see the class docstring).
        No effect on "official" (updated per call) and "none". A step left open (an exception
        inside the previous one) is discarded."""
        self._in_step = True
        self._pool = []

    def end_step(self, update: bool = True) -> int:
        """Close the step: all-gather the pooled g of every rank (a collective: every rank calls it,
        with the same ``update``; no communication inside :meth:`local`) and, if ``update`` and every
        value is finite, update the statistics once from the mean and unbiased std of them all.

        Returns the number of values the update used (0: no update — ``update=False`` for a skipped
        step, nothing pooled (frozen), a non-finite value, or a mode without step statistics)."""
        if not self._in_step:
            raise RuntimeError("MarginNormalizer.end_step() without begin_step()")
        self._in_step = False
        pool, self._pool = self._pool, []
        if self.mode not in ("ema", "batch"):
            return 0
        device = pool[0].device if pool else (self._device or torch.device("cpu"))
        local = torch.cat(pool) if pool else torch.zeros(0, dtype=torch.float64, device=device)
        gathered = self.gather_all(local)
        if not update or gathered.numel() == 0 or not bool(torch.isfinite(gathered).all()):
            return 0
        self._update(gathered)
        return int(gathered.numel())

    # -- statistics ---------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of statistic updates so far."""
        return self._steps

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mu, sigma) used for normalising now, as float64 0-d tensors (reading them needs no
        device sync; :attr:`mu` and :attr:`sigma` give them as floats). Before any update "ema"
        and "batch" give (0, ∞): z = 0."""
        if self.mode == "none":
            return _scalar(0.0), _scalar(1.0)
        if self.mode == "official":
            return self._mu_acc, self._sigma_acc
        if self._steps == 0:
            return _scalar(0.0), _scalar(math.inf)
        if self.mode == "batch":
            return self._batch_mu, self._batch_sigma
        # ema
        correction = 1.0 - self.momentum ** self._steps
        mu = self._mu_acc / correction
        sigma = (self._sigma_acc / correction).clamp_min(self.eps)
        return mu, sigma

    @property
    def mu(self) -> float:
        return float(self.statistics()[0])

    @property
    def sigma(self) -> float:
        return float(self.statistics()[1])

    def gather_all(self, g: Tensor) -> Tensor:
        """All-gather a 1-D tensor over the process group (handles unequal sizes, empty ones too)."""
        g = g.detach().reshape(-1)
        if not self.gather:
            return g
        if not (dist.is_available() and dist.is_initialized()):
            return g
        world = dist.get_world_size(self.process_group)
        if world <= 1:
            return g
        n = torch.tensor([g.numel()], dtype=torch.long, device=g.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=self.process_group)
        counts = [int(s.item()) for s in sizes]
        if max(counts) == 0:
            return g
        padded = g.new_zeros(max(counts))
        padded[: g.numel()] = g
        buffers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buffers, padded, group=self.process_group)
        return torch.cat([b[:c] for b, c in zip(buffers, counts)])

    def _update(self, gathered: Tensor) -> None:
        if self.mode == "official" and gathered.numel() < FEW_VALUES and not self._warned_few:
            self._warned_few = True
            warnings.warn(
                f"α-DPO 'official' margin normaliser: μ, σ updated from {gathered.numel()} values (fewer than "
                f"{FEW_VALUES}). As in the authors' code, each micro-batch's g, gathered over the processes, "
                "updates them, so a std over so few values is noisy and the α-DPO trained depends on the "
                "per-device batch size and the number of processes. The default 'ema' normaliser updates "
                "once per optimiser step from the step's whole global batch.",
                UserWarning,
                stacklevel=3,
            )
        mean, std = _mean_std(gathered)
        device = mean.device
        m = self.momentum
        self._steps += 1
        if self.mode == "batch":
            self._batch_mu = mean
            self._batch_sigma = std.clamp_min(self.eps)
            return
        self._mu_acc = m * self._mu_acc.to(device) + (1.0 - m) * mean
        self._sigma_acc = m * self._sigma_acc.to(device) + (1.0 - m) * std

    def __call__(self, g: Tensor) -> Tensor:
        if self.mode == "none":
            return g
        self._device = g.device
        if self._in_step and self.mode in ("ema", "batch"):
            if self.training:
                self._pool.append(g.detach().reshape(-1).to(torch.float64))
        elif self.mode == "batch" or self.training:
            self._update(self.gather_all(g))
        mu, sigma = self.statistics()
        mu = mu.to(device=g.device)
        sigma = sigma.to(device=g.device)
        z = (g.to(torch.float64) - mu) / sigma
        return z.to(g.dtype)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pending = torch.cat(self._pool) if self._pool else torch.zeros(0, dtype=torch.float64)
        return {
            "mode": self.mode,
            "momentum": self.momentum,
            "eps": self.eps,
            "steps": self._steps,
            "mu_acc": self._mu_acc.detach().cpu().clone(),
            "sigma_acc": self._sigma_acc.detach().cpu().clone(),
            "batch_mu": self._batch_mu.detach().cpu().clone(),
            "batch_sigma": self._batch_sigma.detach().cpu().clone(),
            "in_step": self._in_step,
            "pending": pending.detach().cpu().clone(),
            "warned_few": self._warned_few,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (states saved before steps were pooled, without
        ``in_step``/``pending``, load as "between steps")."""
        if state["mode"] != self.mode:
            raise ValueError(f"normalizer state is for mode {state['mode']!r}, this normalizer is {self.mode!r}")
        if float(state["momentum"]) != self.momentum:
            raise ValueError(f"normalizer state has momentum {state['momentum']}, this normalizer {self.momentum}")
        self.eps = float(state["eps"])
        self._steps = int(state["steps"])

        def t(v: Any) -> Tensor:
            return torch.as_tensor(v, dtype=torch.float64).detach().clone()

        self._mu_acc = t(state["mu_acc"])
        self._sigma_acc = t(state["sigma_acc"])
        self._batch_mu = t(state["batch_mu"])
        self._batch_sigma = t(state["batch_sigma"])
        self._in_step = bool(state.get("in_step", False))
        pending = t(state.get("pending", [])).reshape(-1)
        self._pool = [pending] if pending.numel() else []
        self._warned_few = bool(state.get("warned_few", False))

    def __repr__(self) -> str:
        return (
            f"MarginNormalizer(mode={self.mode!r}, momentum={self.momentum}, eps={self.eps}, "
            f"steps={self._steps}, training={self.training}, in_step={self._in_step})"
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
