"""Preference losses: α-DPO, its paper ablations, and the paper's baselines.

Everything here is a pure function of per-sequence log-probabilities. The only
state is the margin normaliser of α-DPO, which the caller owns and passes in.

Conventions
-----------
* Inputs are per-sequence *summed* log-probabilities of the response tokens
  (:class:`PreferenceLogps`); each method averages them itself when it is
  length-normalised (``logp̄ = Σ_t log π / |y|``).
* Every method returns a :class:`LossOutput` with per-pair ``losses`` (the
  trainer takes ``.mean()``), detached ``chosen_rewards``/``rejected_rewards``,
  and detached ``margins``: the *target margin in ratio units*, i.e. the
  quantity ``m`` such that the method's logit reads ``β·(Δθ − m)`` (documented
  per method).
* ``LOSSES`` is the registry read by the trainer and the CLI;
  :func:`get_loss`, :func:`make_params` and :func:`compute_loss` are the
  helpers around it. :func:`alpha_dpo_loss` is the stand-alone entry point for
  other people's trainers.

α-DPO (code scale; see docs/losses.md and the semantics note)::

    Δθ = p̄θ(w) − p̄θ(l)           Δref = p̄ref(w) − p̄ref(l)
    g  = Δθ − Δref  (detached)      z = normaliser(g)
    m  = sg(gamma_beta_ratio + α·z)
    L  = −(1−ε)·logσ(β(Δθ − m)) − ε·logσ(−β(Δθ − m))

so the logit is ``β·Δθ − γ − α·β·z`` with ``γ = β·gamma_beta_ratio``; α = 0 is
exactly SimPO.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ranges import LOSS_PARAM_RANGES
from .types import AlphaDPOOutput, LossOutput, PreferenceLogps

__all__ = [
    "PreferenceLogps",
    "LossOutput",
    "AlphaDPOOutput",
    "LossMethod",
    "UnknownLossError",
    "MarginNormalizer",
    "NORMALIZER_MODES",
    "AlphaDPOParams",
    "SimPOParams",
    "DPOParams",
    "IPOParams",
    "CPOParams",
    "KTOParams",
    "ORPOParams",
    "RDPOParams",
    "LOSSES",
    "get_loss",
    "make_params",
    "make_normalizer",
    "compute_loss",
    "alpha_dpo_loss",
    "sequence_kl",
]


class UnknownLossError(ValueError):
    """Raised for a loss name that is not in :data:`LOSSES`."""


# --------------------------------------------------------------------------------------
# Margin normaliser
# --------------------------------------------------------------------------------------

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

    def _current(self) -> tuple[Tensor, Tensor]:
        """(mu, sigma) used for normalising now, float64 0-d tensors."""
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
        return float(self._current()[0])

    @property
    def sigma(self) -> float:
        return float(self._current()[1])

    def gather_all(self, g: Tensor) -> Tensor:
        """All-gather a 1-D tensor over the process group (handles unequal sizes)."""
        g = g.detach().reshape(-1)
        if not self.gather:
            return g
        import torch.distributed as dist

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
        mu, sigma = self._current()
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


def _resolve_normalizer(normalization: str | None, normalizer: MarginNormalizer | None) -> MarginNormalizer:
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


# --------------------------------------------------------------------------------------
# Hyperparameter dataclasses
# --------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of the field's ``default`` (YAML gives "5e-2" as a string)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"parameter {key!r} must be a boolean, got {value!r}")
    if isinstance(default, (int, float)):
        if isinstance(value, bool):
            raise ValueError(f"parameter {key!r} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"parameter {key!r} must be a number, got {value!r}") from None
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, (int, float)):
            raise ValueError(f"parameter {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"parameter {key!r} must be finite, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"parameter {key!r} must be a string, got {value!r}")
        return value
    return value


@dataclass
class _Params:
    """Base: coerces every field to its default's type (numeric strings → float) and checks every
    numeric field against its documented range (:data:`alphadpo_cli.ranges.LOSS_PARAM_RANGES`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), f.default)
            setattr(self, f.name, value)
            rng = LOSS_PARAM_RANGES.get(f.name)
            if rng is not None and isinstance(value, float) and not rng.contains(value):
                raise ValueError(f"{type(self).__name__}.{f.name} = {value!r} is out of range: allowed {rng.describe()}")

    def _check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise ValueError(f"{type(self).__name__}.{key} must be one of {list(choices)}, got {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REFERENCE_VARIANTS = ("ratio", "policy", "reference", "inverse_reference")
#: How a chosen-response NLL term (CPO, ORPO, SimPO's sft_weight) is reduced over a micro-batch:
#: "token" weights every chosen token equally (Σ_i Σ_t −log π / Σ_i |y_w,i|, the cross-entropy
#: over the batch's chosen tokens that TRL's CPO/ORPO trainers, ORPO's code and SimPO's trainer
#: compute); "sequence" averages per-sequence means (mean_i of Σ_t −log π / |y_w,i|).
NLL_REDUCTIONS = ("token", "sequence")
MARGIN_SOURCES = ("sequence", "token_kl")


@dataclass
class AlphaDPOParams(_Params):
    """α-DPO hyperparameters (code scale).

    Defaults: β = 2.5 and α = 0.05 as in the Mistral-Instruct setting and the
    paper's recommended α; gamma_beta_ratio = 0.5 is mid-range (the paper's
    Table 4 "γ" column is this ratio: 0.15–0.6). Presets override them.

    * ``normalization``: "ema" (default, bias-corrected), "batch", "none"
      (w/o normalisation: m = γ/β + α·g raw), "official" (authors' exact EMA).
    * ``stop_gradient``: False lets the margin carry gradient through Δθ
      (the paper's collapsing "w/o sg" ablation).
    * ``reference_variant``: implicit reference π̂ref = U·X^α, margin source
      M = log X(w) − log X(l): "ratio" X = πθ/πref (α-DPO), "policy" X = πθ,
      "reference" X = πref, "inverse_reference" X = 1/πref.
    * ``length_normalized``: False uses summed log-probs everywhere (App. B.2).
    * ``margin_source``: "token_kl" replaces M by TDPO's δ (App. B.4), see
      :func:`alpha_dpo_margin_input`.
    * ``normalizer_momentum`` / ``sigma_floor``: the MarginNormalizer a trainer
      builds with :func:`make_normalizer` (EMA momentum 0.9 as the authors; σ floor,
      see :class:`MarginNormalizer`).
    * ``eval_updates_stats``: the held-out batches of the evaluations during training
      (``training.eval_steps``) update the running statistics too, as the authors' code
      does (their TRL evaluation loop runs the loss, and the loss updates μ and σ). On by
      default only in ``alpha_dpo_official``; for a stateful normaliser (ema, official)
      only. The batches are those of the authors' evaluation loop: the split in order,
      ``training.eval_batch_size`` pairs per process, the processes' batches gathered
      (their setting: 4 per device).
    """

    beta: float = 2.5
    gamma_beta_ratio: float = 0.5
    alpha: float = 0.05
    label_smoothing: float = 0.0
    normalization: str = "ema"
    stop_gradient: bool = True
    reference_variant: str = "ratio"
    length_normalized: bool = True
    margin_source: str = "sequence"
    normalizer_momentum: float = 0.9
    sigma_floor: float = 1e-3
    eval_updates_stats: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("normalization", NORMALIZER_MODES)
        if self.eval_updates_stats and self.normalization not in ("ema", "official"):
            raise ValueError(
                f"eval_updates_stats needs a running normaliser (normalization 'ema' or 'official'), "
                f"not {self.normalization!r}"
            )
        self._check_choice("reference_variant", REFERENCE_VARIANTS)
        self._check_choice("margin_source", MARGIN_SOURCES)
        if self.margin_source == "token_kl" and self.reference_variant != "ratio":
            raise ValueError("margin_source='token_kl' replaces the 'ratio' margin; use reference_variant='ratio'")


# Ablation presets: same fields and function, different defaults.
@dataclass
class AlphaDPONoNormParams(AlphaDPOParams):
    normalization: str = "none"


@dataclass
class AlphaDPOBatchNormParams(AlphaDPOParams):
    normalization: str = "batch"


@dataclass
class AlphaDPOOfficialParams(AlphaDPOParams):
    """The authors' code exactly: their EMA (no bias correction, no floor) and evaluation batches
    that update it."""

    normalization: str = "official"
    eval_updates_stats: bool = True


@dataclass
class AlphaDPONoSGParams(AlphaDPOParams):
    stop_gradient: bool = False


@dataclass
class AlphaDPONoGammaParams(AlphaDPOParams):
    gamma_beta_ratio: float = 0.0


@dataclass
class AlphaDPOPolicyRefParams(AlphaDPOParams):
    reference_variant: str = "policy"


@dataclass
class AlphaDPORefRefParams(AlphaDPOParams):
    reference_variant: str = "reference"


@dataclass
class AlphaDPOInvRefParams(AlphaDPOParams):
    reference_variant: str = "inverse_reference"


@dataclass
class AlphaDPOSumParams(AlphaDPOParams):
    length_normalized: bool = False


@dataclass
class AlphaDPOTokenKLParams(AlphaDPOParams):
    margin_source: str = "token_kl"


@dataclass
class SimPOParams(_Params):
    """SimPO. Defaults: the SimPO authors' Llama3-Instruct setting (β 2.5, γ/β 0.55).
    ``sft_weight`` adds ``sft_weight · NLL(chosen)``, reduced by ``nll_reduction``
    (see :data:`NLL_REDUCTIONS`; "token" as SimPO's trainer);
    ``length_normalized=False`` is "SimPO w/o LN" (App. B.2)."""

    beta: float = 2.5
    gamma_beta_ratio: float = 0.55
    sft_weight: float = 0.0
    label_smoothing: float = 0.0
    length_normalized: bool = True
    nll_reduction: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("nll_reduction", NLL_REDUCTIONS)


@dataclass
class SimPOSumParams(SimPOParams):
    length_normalized: bool = False


@dataclass
class DPOParams(_Params):
    """DPO. Default β = 0.01 (the SimPO authors' best DPO setting; range 0.01–0.1)."""

    beta: float = 0.01
    label_smoothing: float = 0.0


@dataclass
class IPOParams(_Params):
    """IPO. τ ∈ {0.01, 0.1, 0.5, 1.0} in the paper; default 0.1 (TRL's default)."""

    tau: float = 0.1


@dataclass
class CPOParams(_Params):
    """CPO. β default 0.1 (CPO's default; paper range 0.01–0.1), NLL weight 1.0 (paper).
    ``nll_reduction``: see :data:`NLL_REDUCTIONS` ("token", as CPO's and TRL's code)."""

    beta: float = 0.1
    nll_weight: float = 1.0
    label_smoothing: float = 0.0
    nll_reduction: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("nll_reduction", NLL_REDUCTIONS)


@dataclass
class KTOParams(_Params):
    """KTO (paired). β default 0.1 (KTO's default), λ_w = λ_l = 1 (paper)."""

    beta: float = 0.1
    lambda_w: float = 1.0
    lambda_l: float = 1.0


@dataclass
class ORPOParams(_Params):
    """ORPO. ``lam`` is ORPO's λ (paper range 0.1–2); default 0.1 (ORPO's default).
    ``nll_reduction``: see :data:`NLL_REDUCTIONS` ("token", as ORPO's and TRL's code)."""

    lam: float = 0.1
    nll_reduction: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("nll_reduction", NLL_REDUCTIONS)


@dataclass
class RDPOParams(_Params):
    """R-DPO. Defaults β = 0.05, α = 0.1 (middle of the paper's search ranges)."""

    beta: float = 0.05
    alpha: float = 0.1


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def _sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·logσ(x) − ε·logσ(−x)."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, numerically stable (x is clamped just below 0).

    Each branch only sees inputs that are safe for it, so the branch torch.where
    discards cannot put NaN into the gradient.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2.0)
    x_near = torch.where(near_zero, x, torch.full_like(x, -math.log(2.0)))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _stats_metrics(prefix: str, x: Tensor) -> dict[str, Tensor]:
    x = x.detach().to(torch.float64)
    std = x.std(unbiased=True) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    return {f"{prefix}/mean": x.mean(), f"{prefix}/std": std, f"{prefix}/min": x.min(), f"{prefix}/max": x.max()}


def _to_floats(metrics: Mapping[str, Tensor | float], device: torch.device | None = None) -> dict[str, float]:
    """Python floats for logging, with a single device sync."""
    if not metrics:
        return {}
    keys = list(metrics)
    values = torch.stack(
        [torch.as_tensor(metrics[k], dtype=torch.float64).reshape(()).to(device) for k in keys]
    ).tolist()
    return dict(zip(keys, values))


def _require_reference(pc: Tensor, rc: Tensor | None, rr: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    if rc is None or rr is None:
        raise ValueError(f"{what} needs reference log-probs (ref_chosen_logps / ref_rejected_logps)")
    return rc, rr


def _chosen_nll(inputs: PreferenceLogps, reduction: str) -> tuple[Tensor, Tensor]:
    """The chosen-response NLL as per-pair terms whose mean is the micro-batch's NLL, and that NLL.

    "token": every chosen token of the micro-batch weighs the same, NLL = Σ_i Σ_t −log π / Σ_i |y_w,i|
    (a cross-entropy over the batch's chosen tokens, as TRL's CPO/ORPO trainers, ORPO's code and
    SimPO's trainer compute it). Pair i's term is −log π(y_w,i) / mean_j |y_w,j|, so that the mean
    over pairs, which is what a trainer back-propagates, is exactly that NLL; one pair's term alone
    is its share, not a per-pair loss. "sequence": the mean of per-sequence means, −log π(y_w,i)/|y_w,i|.
    """
    if reduction == "sequence":
        nll = -inputs.policy_chosen_avg
        return nll, nll.detach().mean()
    if reduction != "token":
        raise ValueError(f"unknown nll_reduction {reduction!r}; valid: {list(NLL_REDUCTIONS)}")
    lengths = inputs.chosen_lengths.to(inputs.policy_chosen_logps.dtype)
    terms = -inputs.policy_chosen_logps / lengths.mean()
    return terms, terms.detach().mean()


def _global_mean(x: Tensor) -> Tensor:
    """Detached mean of ``x`` over every data-parallel rank (Σ and count all-reduced, so unequal
    per-rank sizes are weighted by their counts); the local mean outside torch.distributed."""
    x = x.detach().reshape(-1)
    total = torch.stack([x.to(torch.float64).sum(), torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).to(x.dtype)


# --------------------------------------------------------------------------------------
# α-DPO
# --------------------------------------------------------------------------------------


def _alpha_dpo_core(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    label_smoothing: float,
    normalizer: MarginNormalizer,
    stop_gradient: bool = True,
    reference_variant: str = "ratio",
    margin_input: Tensor | None = None,
) -> LossOutput:
    """The α-DPO formula, on already reduced (averaged or summed) log-probs.

    ``margin_input`` overrides the discrepancy g (TDPO δ ablation).
    """
    if rc is not None:
        rc = rc.detach()
    if rr is not None:
        rr = rr.detach()
    delta_theta = pc - pr

    # log X(y) of the implicit reference π̂ref = U·X^α, per response.
    if reference_variant == "ratio":
        rc_, rr_ = _require_reference(pc, rc, rr, "reference_variant='ratio'")
        log_x_c, log_x_r = pc - rc_, pr - rr_
    elif reference_variant == "policy":
        log_x_c, log_x_r = pc, pr
    elif reference_variant == "reference":
        rc_, rr_ = _require_reference(pc, rc, rr, "reference_variant='reference'")
        log_x_c, log_x_r = rc_, rr_
    elif reference_variant == "inverse_reference":
        rc_, rr_ = _require_reference(pc, rc, rr, "reference_variant='inverse_reference'")
        log_x_c, log_x_r = -rc_, -rr_
    else:
        raise ValueError(f"unknown reference_variant {reference_variant!r}; valid: {list(REFERENCE_VARIANTS)}")

    g = (log_x_c - log_x_r) if margin_input is None else margin_input
    if stop_gradient:
        g = g.detach()
    z = normalizer(g)
    margin = gamma_beta_ratio + alpha * z
    if stop_gradient:
        margin = margin.detach()
    logits = beta * (delta_theta - margin)
    losses = _sigmoid_loss(logits, label_smoothing)

    # β·(log πθ(y) − α·log X(y)); for "ratio" this is exactly what the authors log.
    chosen_rewards = (beta * (pc - alpha * log_x_c)).detach()
    rejected_rewards = (beta * (pr - alpha * log_x_r)).detach()

    mu, sigma = normalizer._current()
    metrics: dict[str, Tensor | float] = dict(_stats_metrics("margin", margin))
    metrics["normalizer/mu"] = mu
    metrics["normalizer/sigma"] = sigma
    metrics["g/mean"] = g.detach().to(torch.float64).mean()
    metrics["z/mean"] = z.detach().to(torch.float64).mean()
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margin.detach(),
        metrics=_to_floats(metrics, losses.device),
    )


def alpha_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    normalizer: MarginNormalizer | None = None,
    label_smoothing: float = 0.0,
) -> AlphaDPOOutput:
    """α-DPO loss on already-reduced per-sequence log-probs, shape [B] each.

    For the paper's method pass the MEAN log-prob over response tokens (sum /
    length); pass sums for the "w/o length normalisation" variant.

    ``normalizer``: a :class:`MarginNormalizer` you keep across steps (its
    mode decides the normalisation; call ``.eval()`` / use ``.frozen()`` for
    evaluation). ``None`` z-scores g with this batch's own local statistics
    (stateless, no cross-rank communication; σ floored at 1e-3, the
    :class:`MarginNormalizer` default ``eps``).

    Returns a :class:`LossOutput`: per-pair ``losses`` (take ``.mean()``),
    detached ``chosen_rewards``/``rejected_rewards`` (β·(p̄θ − α·(p̄θ − p̄ref)),
    as the authors log them) and ``margins`` m_i = gamma_beta_ratio + α·z_i.
    """
    return _alpha_dpo_core(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=float(beta),
        gamma_beta_ratio=float(gamma_beta_ratio),
        alpha=float(alpha),
        label_smoothing=float(label_smoothing),
        normalizer=_resolve_normalizer(None, normalizer),
    )


def alpha_dpo_margin_input(inputs: PreferenceLogps, params: AlphaDPOParams) -> Tensor | None:
    """The TDPO-δ replacement for g when ``margin_source == "token_kl"`` (else None).

    TDPO's δ = β·KL_seq(y_l) − β·KL_seq(y_w) with KL_seq = Σ_t KL(πref‖πθ).
    Lemma 4.3 approximates KL_seq(y) ≈ log πref(y) − log πθ(y), so
    δ ≈ β·[(log πθ − log πref)(y_w) − (log πθ − log πref)(y_l)] = β·M: δ has the
    SAME sign as M (rejected KL minus chosen KL). In code scale (no β, which
    z-scoring removes anyway) and length-normalised like M (the paper credits
    length normalisation, γ and z-scoring for the gain):

        g = KL_seq(y_l)/|y_l| − KL_seq(y_w)/|y_w|      (sums if length_normalized=False)

    With stop_gradient=False the gradient flows through the KLs into πθ.
    """
    if params.margin_source != "token_kl":
        return None
    if not inputs.has_token_kl:
        raise ValueError("margin_source='token_kl' needs chosen_seq_kl / rejected_seq_kl (see sequence_kl())")
    if params.length_normalized:
        kl_w, kl_l = inputs.averaged("chosen_seq_kl"), inputs.averaged("rejected_seq_kl")
    else:
        kl_w, kl_l = inputs.chosen_seq_kl, inputs.rejected_seq_kl
    return kl_l - kl_w  # type: ignore[operator]


def _alpha_dpo_fn(
    inputs: PreferenceLogps, params: AlphaDPOParams, normalizer: MarginNormalizer | None = None
) -> LossOutput:
    """α-DPO and its ablations (registry entry). margins: gamma_beta_ratio + α·z."""
    pc, pr, rc, rr = inputs.reduced(params.length_normalized)
    return _alpha_dpo_core(
        pc,
        pr,
        rc,
        rr,
        beta=params.beta,
        gamma_beta_ratio=params.gamma_beta_ratio,
        alpha=params.alpha,
        label_smoothing=params.label_smoothing,
        normalizer=_resolve_normalizer(params.normalization, normalizer),
        stop_gradient=params.stop_gradient,
        reference_variant=params.reference_variant,
        margin_input=alpha_dpo_margin_input(inputs, params),
    )


# --------------------------------------------------------------------------------------
# Baselines (paper Table 3)
# --------------------------------------------------------------------------------------


def _simpo_fn(inputs: PreferenceLogps, params: SimPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """SimPO: −logσ(β·Δθ − β·gamma_beta_ratio) (+ε smoothing) + sft_weight·NLL(chosen).

    Δθ on averaged log-probs (summed if length_normalized=False). The NLL is the
    cross-entropy over the micro-batch's chosen tokens, as SimPO's trainer computes
    its ``sft_loss`` (``nll_reduction="token"``; "sequence" averages per-sequence
    means), see :func:`_chosen_nll`. rewards β·p̄θ; margins = gamma_beta_ratio (constant).
    """
    pc, pr, _, _ = inputs.reduced(params.length_normalized)
    logits = params.beta * (pc - pr - params.gamma_beta_ratio)
    losses = _sigmoid_loss(logits, params.label_smoothing)
    metrics: dict[str, Tensor | float] = {}
    if params.sft_weight:
        nll_terms, nll = _chosen_nll(inputs, params.nll_reduction)
        losses = losses + params.sft_weight * nll_terms
        metrics["nll"] = nll
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * pc).detach(),
        rejected_rewards=(params.beta * pr).detach(),
        margins=torch.full_like(pc, params.gamma_beta_ratio).detach(),
        metrics=_to_floats(metrics),
    )


def _dpo_fn(inputs: PreferenceLogps, params: DPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """DPO (sigmoid): −logσ(β·((log πθ − log πref)(w) − (…)(l))), summed log-probs,
    optional label smoothing (cDPO). rewards β·(log πθ − log πref); margins 0."""
    pc, pr, rc, rr = inputs.reduced(False)
    rc, rr = _require_reference(pc, rc, rr, "dpo")
    r_w, r_l = pc - rc, pr - rr
    losses = _sigmoid_loss(params.beta * (r_w - r_l), params.label_smoothing)
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * r_w).detach(),
        rejected_rewards=(params.beta * r_l).detach(),
        margins=torch.zeros_like(pc).detach(),
    )


def _ipo_fn(inputs: PreferenceLogps, params: IPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """IPO: (h − 1/(2τ))², h = (p̄θ − p̄ref)(w) − (p̄θ − p̄ref)(l).

    Uses LENGTH-AVERAGED log-probs (p̄ = Σ_t log π / |y|), as TRL's IPO does (a
    convention TRL confirmed with the IPO authors). The α-DPO paper's Table 3
    writes the sequence-level form, h on summed log-probs; this implementation
    deliberately follows TRL instead. rewards: the averaged log-ratios
    p̄θ − p̄ref (unscaled); margins 1/(2τ).
    """
    pc, pr, rc, rr = inputs.reduced(True)
    rc, rr = _require_reference(pc, rc, rr, "ipo")
    r_w, r_l = pc - rc, pr - rr
    target = 1.0 / (2.0 * params.tau)
    losses = (r_w - r_l - target) ** 2
    return LossOutput(
        losses=losses,
        chosen_rewards=r_w.detach(),
        rejected_rewards=r_l.detach(),
        margins=torch.full_like(pc, target).detach(),
    )


def _cpo_fn(inputs: PreferenceLogps, params: CPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """CPO: −logσ(β·(log πθ(w) − log πθ(l))) (summed, +ε smoothing) + nll_weight·NLL(chosen).
    No reference. The NLL is the cross-entropy over the micro-batch's chosen tokens, as CPO's
    code and TRL's CPOTrainer compute it (``nll_reduction="token"``; "sequence" averages
    per-sequence means), see :func:`_chosen_nll`. (Table 3 writes the NLL inside the sigmoid;
    CPO's own objective, and this one, adds it outside.) rewards β·log πθ; margins 0."""
    pc, pr, _, _ = inputs.reduced(False)
    losses = _sigmoid_loss(params.beta * (pc - pr), params.label_smoothing)
    nll_terms, nll = _chosen_nll(inputs, params.nll_reduction)
    losses = losses + params.nll_weight * nll_terms
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * pc).detach(),
        rejected_rewards=(params.beta * pr).detach(),
        margins=torch.zeros_like(pc).detach(),
        metrics=_to_floats({"nll": nll}),
    )


def _kto_fn(inputs: PreferenceLogps, params: KTOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """KTO on paired data (KTO paper eq. 7, each pair = one desirable + one undesirable example):

        r = log πθ − log πref (summed)
        z_w = β·max(0, mean(r_l)),   z_l = β·max(0, mean(r_w))        (detached, over all ranks)
        L_i = ½·[ λ_w·(1 − σ(β·r_w,i − z_w)) + λ_l·(1 − σ(z_l − β·r_l,i)) ]

    * The loss is the mean over the 2B examples, as TRL's KTOTrainer and the α-DPO authors'
      ``kto`` loss take it: each pair's two terms are halved, so ``losses.mean()`` is that mean
      (at πθ = πref every example gives 1 − σ(0) = 0.5).
    * z_ref: the estimate of the α-DPO authors' code (TRL 0.8.6's paired KTO): the KL term of the
      chosen examples is the batch mean log-ratio of the rejected half, and that of the rejected
      examples the mean of the chosen half, each clamped at 0. It is all-reduced over the
      data-parallel ranks, as TRL does with its KL estimate (sum and count, so the global batch
      mean). As in the KTO paper and TRL, no gradient flows through it (TRL 0.8.6's paired
      version did let one flow). TRL's unpaired KTOTrainer instead scores mismatched
      prompt/completion pairs, an extra forward this paired pipeline does not run.
    * The paper's Table 3 prints the rejected term as "+λ_l σ(…)": a sign typo; KTO's own
      λ_l·(1 − σ(z_ref − β·r_l)) is used.

    rewards β·r; margins: the KL estimate the chosen term uses, z_w/β, per pair.
    """
    pc, pr, rc, rr = inputs.reduced(False)
    rc, rr = _require_reference(pc, rc, rr, "kto")
    r_w, r_l = pc - rc, pr - rr
    kl_w = _global_mean(r_w).clamp(min=0)  # mean log-ratio of the chosen half: used by the rejected term
    kl_l = _global_mean(r_l).clamp(min=0)  # ... of the rejected half: used by the chosen term
    chosen_losses = params.lambda_w * (1.0 - torch.sigmoid(params.beta * (r_w - kl_l)))
    rejected_losses = params.lambda_l * (1.0 - torch.sigmoid(params.beta * (kl_w - r_l)))
    losses = 0.5 * (chosen_losses + rejected_losses)
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * r_w).detach(),
        rejected_rewards=(params.beta * r_l).detach(),
        margins=kl_l.expand_as(pc).clone(),
        metrics=_to_floats({"kl/chosen": kl_w, "kl/rejected": kl_l}),
    )


def _orpo_fn(inputs: PreferenceLogps, params: ORPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """ORPO: NLL(chosen) − λ·logσ(odds(w) − odds(l)),
    odds(y) = p̄ − log(1 − exp(p̄)) with p̄ the mean per-token log-prob (stable log1mexp).
    The NLL is the cross-entropy over the micro-batch's chosen tokens, as ORPO's code and
    TRL's ORPOTrainer compute it (``nll_reduction="token"``; "sequence" averages per-sequence
    means), see :func:`_chosen_nll`. No reference. rewards λ·p̄θ (as TRL logs them); margins 0."""
    pc, pr, _, _ = inputs.reduced(True)
    log_odds = (pc - _log1mexp(pc)) - (pr - _log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    nll_terms, nll = _chosen_nll(inputs, params.nll_reduction)
    losses = nll_terms - params.lam * ratio
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.lam * pc).detach(),
        rejected_rewards=(params.lam * pr).detach(),
        margins=torch.zeros_like(pc).detach(),
        metrics=_to_floats({"nll": nll, "log_odds_ratio": log_odds.detach().mean()}),
    )


def _rdpo_fn(inputs: PreferenceLogps, params: RDPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """R-DPO: −logσ(β·(r_w − r_l) + α·(|y_w| − |y_l|)), r = log πθ − log πref summed.

    The sign follows the R-DPO paper (Park et al., 2024, "Disentangling Length from Quality in
    Direct Preference Optimization"): it maximises the reward minus α·|y| under the KL
    constraint, so the implicit reward is β·log(πθ/πref) + α·|y| (+ a prompt constant) and the
    Bradley-Terry logit gains +α·(|y_w| − |y_l|). A longer chosen answer then already explains
    part of the preference, which is what curbs length exploitation. The α-DPO paper's Table 3
    prints "− α(|y_w| − |y_l|)", which would reward length instead; it is not used. (The α-DPO
    authors' own ``rDPO`` subtracts α times the difference of two batch sizes: always 0.)
    rewards β·r; margins −α·(|y_w| − |y_l|)/β, the m of logit = β·(h_w − h_l − m).
    """
    pc, pr, rc, rr = inputs.reduced(False)
    rc, rr = _require_reference(pc, rc, rr, "rdpo")
    r_w, r_l = pc - rc, pr - rr
    length_term = params.alpha * (inputs.chosen_lengths.to(pc.dtype) - inputs.rejected_lengths.to(pc.dtype))
    losses = -F.logsigmoid(params.beta * (r_w - r_l) + length_term)
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * r_w).detach(),
        rejected_rewards=(params.beta * r_l).detach(),
        margins=(-length_term / params.beta).detach(),
    )


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossMethod:
    name: str
    fn: Callable[..., LossOutput]
    params_cls: type
    needs_reference: bool
    length_normalized: bool
    uses_chosen_nll: bool
    needs_token_kl: bool
    uses_normalizer: bool
    description: str

    def default_params(self) -> Any:
        return self.params_cls()


def _alpha(name: str, params_cls: type, description: str) -> LossMethod:
    p = params_cls()
    return LossMethod(
        name=name,
        fn=_alpha_dpo_fn,
        params_cls=params_cls,
        needs_reference=p.reference_variant != "policy" or p.margin_source == "token_kl",
        length_normalized=p.length_normalized,
        uses_chosen_nll=False,
        needs_token_kl=p.margin_source == "token_kl",
        uses_normalizer=p.normalization != "none",
        description=description,
    )


_METHODS = [
    _alpha("alpha_dpo", AlphaDPOParams, "α-DPO: SimPO logit minus a detached, z-scored adaptive margin γ/β + α·z(M)"),
    _alpha("alpha_dpo_no_norm", AlphaDPONoNormParams, "α-DPO ablation: no z-normalisation (m = γ/β + α·M raw)"),
    _alpha("alpha_dpo_batch_norm", AlphaDPOBatchNormParams, "α-DPO with per-batch (not EMA) z-scoring"),
    _alpha("alpha_dpo_official", AlphaDPOOfficialParams, "α-DPO with the authors' exact EMA (no bias correction/eps)"),
    _alpha("alpha_dpo_no_sg", AlphaDPONoSGParams, "α-DPO ablation: margin without stop-gradient"),
    _alpha("alpha_dpo_no_gamma", AlphaDPONoGammaParams, "α-DPO ablation: γ = 0"),
    _alpha("alpha_dpo_policy_ref", AlphaDPOPolicyRefParams, "α-DPO ablation: implicit reference U·πθ^α (M = Δθ)"),
    _alpha("alpha_dpo_ref_ref", AlphaDPORefRefParams, "α-DPO ablation: implicit reference U·πref^α (M = Δref)"),
    _alpha("alpha_dpo_inv_ref", AlphaDPOInvRefParams, "α-DPO ablation: implicit reference U·(1/πref)^α (M = −Δref)"),
    _alpha("alpha_dpo_sum", AlphaDPOSumParams, "α-DPO without length normalisation (summed log-probs, App. B.2)"),
    _alpha("alpha_dpo_token_kl", AlphaDPOTokenKLParams, "α-DPO with TDPO's token-level δ instead of M (App. B.4)"),
    LossMethod("simpo", _simpo_fn, SimPOParams, False, True, False, False, False,
               "SimPO: −logσ(βΔθ − γ) on averaged log-probs, optional SFT term"),
    LossMethod("simpo_sum", _simpo_fn, SimPOSumParams, False, False, False, False, False,
               "SimPO without length normalisation (App. B.2)"),
    LossMethod("dpo", _dpo_fn, DPOParams, True, False, False, False, False,
               "DPO (sigmoid) on summed log-probs, optional label smoothing"),
    LossMethod("ipo", _ipo_fn, IPOParams, True, True, False, False, False,
               "IPO: (h − 1/(2τ))² on length-averaged log-ratios (TRL convention)"),
    LossMethod("cpo", _cpo_fn, CPOParams, False, False, True, False, False,
               "CPO: −logσ(β(log πθ(w) − log πθ(l))) + NLL(chosen); no reference"),
    LossMethod("kto", _kto_fn, KTOParams, True, False, False, False, False,
               "KTO on paired data: mean over the 2B examples, cross-half batch KL estimate z_ref (all-reduced)"),
    LossMethod("orpo", _orpo_fn, ORPOParams, False, True, True, False, False,
               "ORPO: NLL(chosen) − λ·logσ(log-odds ratio); no reference"),
    LossMethod("rdpo", _rdpo_fn, RDPOParams, True, False, False, False, False,
               "R-DPO: DPO plus a length-difference term α(|y_w| − |y_l|) in the logit (R-DPO paper's sign)"),
]  # fmt: skip

#: THE registry: method name → :class:`LossMethod`.
LOSSES: dict[str, LossMethod] = {m.name: m for m in _METHODS}


def get_loss(name: str) -> LossMethod:
    """Registry lookup; unknown names raise :class:`UnknownLossError` listing the valid ones."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        pass
    valid = sorted(LOSSES)
    msg = f"unknown loss {name!r}; valid losses: {', '.join(valid)}"
    close = difflib.get_close_matches(str(name), valid, n=1)
    if close:
        msg += f". Did you mean {close[0]!r}?"
    raise UnknownLossError(msg)


def make_params(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The method's params dataclass with its defaults, updated by ``overrides``.

    Unknown keys raise ValueError naming the key, the method and the valid keys;
    numeric strings ("5e-2", as YAML 1.1 reads the authors' configs) become floats.
    """
    method = get_loss(name)
    overrides = dict(overrides or {})
    valid = [f.name for f in dataclasses.fields(method.params_cls)]
    for key in overrides:
        if key not in valid:
            msg = f"unknown parameter {key!r} for loss {name!r}; valid keys: {', '.join(valid)}"
            close = difflib.get_close_matches(str(key), valid, n=1)
            if close:
                msg += f". Did you mean {close[0]!r}?"
            raise ValueError(msg)
    return method.params_cls(**overrides)


def make_normalizer(
    name: str, params: Any = None, *, momentum: float | None = None, eps: float | None = None,
    process_group: Any = None,
) -> MarginNormalizer | None:
    """The MarginNormalizer a trainer should keep for method ``name`` (None if it uses none).

    momentum and eps default to the params' ``normalizer_momentum`` and ``sigma_floor``."""
    method = get_loss(name)
    if not method.uses_normalizer and params is None:
        return None
    params = _coerce_params(method, params)
    mode = getattr(params, "normalization", None)
    if mode is None or mode == "none":
        return None
    if momentum is None:
        momentum = getattr(params, "normalizer_momentum", 0.9)
    if eps is None:
        eps = getattr(params, "sigma_floor", 1e-3)
    return MarginNormalizer(mode=mode, momentum=momentum, eps=eps, process_group=process_group)


def _coerce_params(method: LossMethod, params: Any) -> Any:
    if params is None:
        return method.params_cls()
    if isinstance(params, Mapping):
        return make_params(method.name, params)
    if isinstance(params, method.params_cls):
        return params
    # Accept the base dataclass of a preset (e.g. AlphaDPOParams for "alpha_dpo_no_norm").
    if dataclasses.is_dataclass(params) and type(params) is not _Params and issubclass(method.params_cls, type(params)):
        return params
    raise TypeError(f"loss {method.name!r} expects {method.params_cls.__name__} or a dict, got {type(params).__name__}")


def compute_loss(
    name: str,
    inputs: PreferenceLogps,
    params: Any = None,
    normalizer: MarginNormalizer | None = None,
) -> LossOutput:
    """Run registered method ``name``. ``params``: its dataclass, a dict of overrides, or None (defaults)."""
    method = get_loss(name)
    params = _coerce_params(method, params)
    if method.needs_reference and not inputs.has_reference:
        raise ValueError(f"loss {name!r} needs ref_chosen_logps / ref_rejected_logps")
    return method.fn(inputs, params, normalizer)


# --------------------------------------------------------------------------------------
# Token-level KL (TDPO δ input)
# --------------------------------------------------------------------------------------


def sequence_kl(ref_logits: Tensor, policy_logits: Tensor, mask: Tensor) -> Tensor:
    """Σ_t KL(πref(·|t) ‖ πθ(·|t)) over the masked positions → [B].

    ``ref_logits``/``policy_logits``: [B, T, V] already aligned with ``mask``
    ([B, T], 1 on the positions that predict response tokens). Computed in
    float32 (float64 if given); the reference side is detached, gradient flows
    into ``policy_logits``.
    """
    if ref_logits.shape != policy_logits.shape or ref_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"shape mismatch: ref {tuple(ref_logits.shape)}, policy {tuple(policy_logits.shape)}, mask {tuple(mask.shape)}"
        )
    dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    ref_logp = torch.log_softmax(ref_logits.detach().to(dtype), dim=-1)
    pol_logp = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - pol_logp)).sum(-1)
    return (kl * mask.to(dtype)).sum(-1)
