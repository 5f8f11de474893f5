"""α-DPO's margin normaliser: z-scores the per-pair discrepancy g with running (or batch) statistics."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["NORMALIZER_MODES", "MarginNormalizer", "resolve_normalizer"]

NORMALIZER_MODES = ("ema", "batch", "none", "official")


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased (N−1) std in float64; std is 0 when N == 1."""
    x = x.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n == 0:
        raise ValueError("cannot normalise an empty batch of margins")
    mean = x.mean()
    std = x.std(unbiased=True) if n > 1 else torch.zeros((), dtype=torch.float64, device=x.device)
    return mean, std


class MarginNormalizer:
    """Z-scores α-DPO's per-pair discrepancy ``g`` (the paper's M, eq. 11).

    ``z = normalizer(g)``:

    1. ``g`` (detached) is all-gathered over the data-parallel group when
       ``torch.distributed`` is initialised with world size > 1 and
       ``gather=True`` (unequal per-rank sizes are fine; a no-op in one process);
    2. if updating is enabled (``training`` is True and not inside
       :meth:`frozen`) the statistics are updated with the gathered batch —
       before normalising, so the current batch is included, as the authors do;
    3. the *local* ``g`` is normalised: ``z = (g − mu) / sigma``. ``mu`` and
       ``sigma`` are constants (no gradient flows into the statistics; if ``g``
       carries a gradient, so does ``z`` through the numerator).

    Modes

    * ``"ema"`` (default): bias-corrected EMA. Raw accumulators start at 0 and
      ``a ← m·a + (1−m)·stat``; the value used is ``a / (1 − m^t)`` after t
      updates, so step 1 uses exactly the batch's own mean/std. ``sigma`` is
      floored at ``eps``. Before any update (t = 0) it is the identity
      (mu = 0, sigma = 1).
    * ``"batch"``: the (gathered) batch's own statistics every call, sigma
      floored at ``eps``. Stateless; ``training``/``frozen`` do not matter.
    * ``"none"``: ``z = g``.
    * ``"official"``: the authors' code: mu, sigma start at 0,
      ``mu ← m·mu + (1−m)·mean``, ``sigma ← m·sigma + (1−m)·std``, no bias
      correction, no epsilon: the first steps divide by (nearly) zero and can
      give inf/NaN. For reproducing their runs only. Their code also updates
      during evaluation: the trainer does that for ``eval_updates_stats``
      (:class:`AlphaDPOParams`), on by default in the official mode.

    std is always the unbiased (N−1) estimate, 0 for N == 1.

    ``eps`` (default 1e-3) floors sigma. At step 1 the policy equals the
    reference, so g is pure rounding noise (~1e-7 in fp32, ~1e-3 in bf16);
    z-scoring it with a tiny floor blows that noise up to O(1) margins, and
    two correct runs that round differently (precomputed vs online reference,
    one process vs several) then train differently. With the 1e-3 floor the
    adaptive margin stays ≈ 0 until the policy has really moved away from the
    reference; once std(g) is past ~1e-2 (within tens of steps) the floor no
    longer bites. It also guards against dividing by zero when every g in a
    batch is identical. Statistics are held in float64.

    ``state_dict()``/``load_state_dict()`` save and restore everything
    (checkpoint it with the trainer; the authors' code forgets it on resume).
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
        # statistics of the last batch (batch mode's mu/sigma)
        self._batch_mu = torch.zeros((), dtype=torch.float64)
        self._batch_sigma = torch.ones((), dtype=torch.float64)

    # -- train / eval -------------------------------------------------------------
    def train(self, mode: bool = True) -> "MarginNormalizer":
        self.training = bool(mode)
        return self

    def eval(self) -> "MarginNormalizer":
        return self.train(False)

    @contextlib.contextmanager
    def frozen(self) -> Iterator["MarginNormalizer"]:
        """Normalise without updating the statistics inside the block."""
        previous = self.training
        self.training = False
        try:
            yield self
        finally:
            self.training = previous

    @contextlib.contextmanager
    def local(self) -> Iterator["MarginNormalizer"]:
        """Inside the block, updates use the batch given as it is, with no all-gather: for a caller
        that already holds the global batch on every rank (the trainer's evaluation, which scores
        the whole held-out split in each process)."""
        previous = self.gather
        self.gather = False
        try:
            yield self
        finally:
            self.gather = previous

    # -- statistics -----------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of statistic updates so far."""
        return self._steps

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mu, sigma) used for normalising now, as float64 0-d tensors (reading them needs no
        device sync; :attr:`mu` and :attr:`sigma` give them as floats)."""
        if self.mode == "none":
            return torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        if self.mode == "batch":
            return self._batch_mu, self._batch_sigma
        if self.mode == "official":
            return self._mu_acc, self._sigma_acc
        # ema
        if self._steps == 0:
            return torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
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
        """All-gather a 1-D tensor over the process group (handles unequal sizes)."""
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
        padded = g.new_zeros(max(counts))
        padded[: g.numel()] = g
        buffers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buffers, padded, group=self.process_group)
        return torch.cat([b[:c] for b, c in zip(buffers, counts)])

    def _update(self, gathered: Tensor) -> None:
        mean, std = _mean_std(gathered)
        device = mean.device
        m = self.momentum
        if self.mode == "batch":
            self._batch_mu = mean
            self._batch_sigma = std.clamp_min(self.eps)
            return
        self._mu_acc = m * self._mu_acc.to(device) + (1.0 - m) * mean
        self._sigma_acc = m * self._sigma_acc.to(device) + (1.0 - m) * std
        self._steps += 1

    def __call__(self, g: Tensor) -> Tensor:
        if self.mode == "none":
            return g
        if self.mode == "batch" or self.training:
            self._update(self.gather_all(g))
        mu, sigma = self.statistics()
        mu = mu.to(device=g.device)
        sigma = sigma.to(device=g.device)
        z = (g.to(torch.float64) - mu) / sigma
        return z.to(g.dtype)

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "momentum": self.momentum,
            "eps": self.eps,
            "steps": self._steps,
            "mu_acc": self._mu_acc.detach().cpu().clone(),
            "sigma_acc": self._sigma_acc.detach().cpu().clone(),
            "batch_mu": self._batch_mu.detach().cpu().clone(),
            "batch_sigma": self._batch_sigma.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
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

    def __repr__(self) -> str:
        return (
            f"MarginNormalizer(mode={self.mode!r}, momentum={self.momentum}, eps={self.eps}, "
            f"steps={self._steps}, training={self.training})"
        )


def resolve_normalizer(normalization: str | None, normalizer: MarginNormalizer | None) -> MarginNormalizer:
    """Which normaliser a loss call uses.

    * ``normalization == "none"`` → identity (the ablation wins over any normaliser given);
    * no normaliser given → a fresh, per-process (no communication) normaliser of the
      requested mode, i.e. the call behaves like the first training step: "ema" and
      "batch" z-score with this batch's own statistics, "official" does the authors'
      first update (mu = 0.1·mean, sigma = 0.1·std); ``normalization=None`` means "batch";
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
