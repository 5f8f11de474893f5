"""The α-DPO paper's baselines (its Table 3): SimPO, DPO, IPO, CPO, KTO, ORPO and R-DPO.

Each method computes what its own authors' code computes; where Table 3 prints something else,
the original wins, and the method's docstring says why. Each method is a params dataclass (its
hyperparameters and defaults) and a function ``(inputs, params, normalizer) → LossOutput``; none
of them uses the normaliser. Inputs are summed log-probs; ``p̄ = Σ_t log π / |y|`` is the average.
``margins`` are the m of each method's logit ``β·(h_w − h_l − m)``, as the docstrings say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .common import LossMetrics, require_reference, sigmoid_loss
from .normalizer import MarginNormalizer
from .params import LossParams
from .types import LossOutput, PreferenceLogps

#: How a chosen-response NLL term (CPO, ORPO, SimPO's sft_weight) is reduced over a micro-batch:
#: "token" weights every chosen token equally (Σ_i Σ_t −log π / Σ_i |y_w,i|, the cross-entropy
#: over the batch's chosen tokens that TRL's CPO/ORPO trainers, ORPO's code and SimPO's trainer
#: compute); "sequence" averages per-sequence means (mean_i of Σ_t −log π / |y_w,i|).
NLL_REDUCTIONS = ("token", "sequence")


# -- SimPO ----------------------------------------------------------------------------------------


@dataclass
class SimPOParams(LossParams):
    """SimPO. Defaults: the SimPO authors' Llama3-Instruct setting (β 2.5, γ/β 0.55).
    ``sft_weight`` adds ``sft_weight · NLL(chosen)``, reduced by ``nll_reduction``
    (see :data:`NLL_REDUCTIONS`; "token" as SimPO's trainer);
    ``length_normalized=False`` is "SimPO w/o LN" (App. B.2, the ``simpo_sum`` row)."""

    beta: float = 2.5
    gamma_beta_ratio: float = 0.55
    sft_weight: float = 0.0
    label_smoothing: float = 0.0
    length_normalized: bool = True
    nll_reduction: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("nll_reduction", NLL_REDUCTIONS)


def simpo_fn(inputs: PreferenceLogps, params: SimPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """SimPO (Meng et al., 2024): −logσ(β·Δθ − β·gamma_beta_ratio) (+ε smoothing) + sft_weight·NLL(chosen).

    Δθ = p̄θ(w) − p̄θ(l) on averaged log-probs (summed if length_normalized=False). The NLL is the
    cross-entropy over the micro-batch's chosen tokens, as SimPO's trainer computes
    its ``sft_loss`` (``nll_reduction="token"``; "sequence" averages per-sequence
    means), see :func:`_chosen_nll`. rewards β·p̄θ; margins = gamma_beta_ratio (constant).
    """
    pc, pr, _, _ = inputs.reduced(params.length_normalized)
    logits = params.beta * (pc - pr - params.gamma_beta_ratio)
    losses = sigmoid_loss(logits, params.label_smoothing)
    metrics: dict[str, Tensor] = {}
    if params.sft_weight:
        nll_terms, nll = _chosen_nll(inputs, params.nll_reduction)
        losses = losses + params.sft_weight * nll_terms
        metrics["nll"] = nll
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * pc).detach(),
        rejected_rewards=(params.beta * pr).detach(),
        margins=torch.full_like(pc, params.gamma_beta_ratio).detach(),
        metrics=LossMetrics(metrics),
    )


# -- DPO ------------------------------------------------------------------------------------------


@dataclass
class DPOParams(LossParams):
    """DPO. Default β = 0.01 (the SimPO authors' best DPO setting; range 0.01–0.1)."""

    beta: float = 0.01
    label_smoothing: float = 0.0


def dpo_fn(inputs: PreferenceLogps, params: DPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """DPO (Rafailov et al., 2023), sigmoid: −logσ(β·((log πθ − log πref)(w) − (…)(l))), summed
    log-probs, optional label smoothing (cDPO). rewards β·(log πθ − log πref); margins 0."""
    pc, pr, rc, rr = inputs.reduced(False)
    rc, rr = require_reference(pc, rc, rr, "dpo")
    r_w, r_l = pc - rc, pr - rr
    losses = sigmoid_loss(params.beta * (r_w - r_l), params.label_smoothing)
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * r_w).detach(),
        rejected_rewards=(params.beta * r_l).detach(),
        margins=torch.zeros_like(pc).detach(),
    )


# -- IPO ------------------------------------------------------------------------------------------


@dataclass
class IPOParams(LossParams):
    """IPO. τ ∈ {0.01, 0.1, 0.5, 1.0} in the paper; default 0.1 (TRL's default)."""

    tau: float = 0.1


def ipo_fn(inputs: PreferenceLogps, params: IPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """IPO (Azar et al., 2023): (h − 1/(2τ))², h = (p̄θ − p̄ref)(w) − (p̄θ − p̄ref)(l).

    Uses LENGTH-AVERAGED log-probs (p̄ = Σ_t log π / |y|), as TRL's IPO does (a
    convention TRL confirmed with the IPO authors). The α-DPO paper's Table 3
    writes the sequence-level form, h on summed log-probs; this implementation
    deliberately follows TRL instead. rewards: the averaged log-ratios
    p̄θ − p̄ref (unscaled); margins 1/(2τ).
    """
    pc, pr, rc, rr = inputs.reduced(True)
    rc, rr = require_reference(pc, rc, rr, "ipo")
    r_w, r_l = pc - rc, pr - rr
    target = 1.0 / (2.0 * params.tau)
    losses = (r_w - r_l - target) ** 2
    return LossOutput(
        losses=losses,
        chosen_rewards=r_w.detach(),
        rejected_rewards=r_l.detach(),
        margins=torch.full_like(pc, target).detach(),
    )


# -- CPO ------------------------------------------------------------------------------------------


@dataclass
class CPOParams(LossParams):
    """CPO. β default 0.1 (CPO's default; paper range 0.01–0.1), NLL weight 1.0 (paper).
    ``nll_reduction``: see :data:`NLL_REDUCTIONS` ("token", as CPO's and TRL's code)."""

    beta: float = 0.1
    nll_weight: float = 1.0
    label_smoothing: float = 0.0
    nll_reduction: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("nll_reduction", NLL_REDUCTIONS)


def cpo_fn(inputs: PreferenceLogps, params: CPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """CPO (Xu et al., 2024): −logσ(β·(log πθ(w) − log πθ(l))) (summed, +ε smoothing) + nll_weight·NLL(chosen).

    No reference. The NLL is the cross-entropy over the micro-batch's chosen tokens, as CPO's
    code and TRL's CPOTrainer compute it (``nll_reduction="token"``; "sequence" averages
    per-sequence means), see :func:`_chosen_nll`. (Table 3 writes the NLL inside the sigmoid;
    CPO's own objective, and this one, adds it outside.) rewards β·log πθ; margins 0.
    """
    pc, pr, _, _ = inputs.reduced(False)
    losses = sigmoid_loss(params.beta * (pc - pr), params.label_smoothing)
    nll_terms, nll = _chosen_nll(inputs, params.nll_reduction)
    losses = losses + params.nll_weight * nll_terms
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * pc).detach(),
        rejected_rewards=(params.beta * pr).detach(),
        margins=torch.zeros_like(pc).detach(),
        metrics=LossMetrics({"nll": nll}),
    )


# -- KTO ------------------------------------------------------------------------------------------


@dataclass
class KTOParams(LossParams):
    """KTO (paired). β default 0.1 (KTO's default), λ_w = λ_l = 1 (paper)."""

    beta: float = 0.1
    lambda_w: float = 1.0
    lambda_l: float = 1.0


def kto_fn(inputs: PreferenceLogps, params: KTOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """KTO (Ethayarajh et al., 2024) on paired data (KTO paper eq. 7, each pair = one desirable +
    one undesirable example):

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
    rc, rr = require_reference(pc, rc, rr, "kto")
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
        metrics=LossMetrics({"kl/chosen": kl_w, "kl/rejected": kl_l}),
    )


# -- ORPO -----------------------------------------------------------------------------------------


@dataclass
class ORPOParams(LossParams):
    """ORPO. ``lam`` is ORPO's λ (paper range 0.1–2); default 0.1 (ORPO's default).
    ``nll_reduction``: see :data:`NLL_REDUCTIONS` ("token", as ORPO's and TRL's code)."""

    lam: float = 0.1
    nll_reduction: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("nll_reduction", NLL_REDUCTIONS)


def orpo_fn(inputs: PreferenceLogps, params: ORPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
    """ORPO (Hong et al., 2024): NLL(chosen) − λ·logσ(odds(w) − odds(l)),
    odds(y) = p̄ − log(1 − exp(p̄)) with p̄ the mean per-token log-prob (stable log1mexp).

    The NLL is the cross-entropy over the micro-batch's chosen tokens, as ORPO's code and
    TRL's ORPOTrainer compute it (``nll_reduction="token"``; "sequence" averages per-sequence
    means), see :func:`_chosen_nll`. No reference. rewards λ·p̄θ (as TRL logs them); margins 0.
    """
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
        metrics=LossMetrics({"nll": nll, "log_odds_ratio": log_odds.detach().mean()}),
    )


# -- R-DPO ----------------------------------------------------------------------------------------


@dataclass
class RDPOParams(LossParams):
    """R-DPO. Defaults β = 0.05, α = 0.1 (middle of the paper's search ranges)."""

    beta: float = 0.05
    alpha: float = 0.1


def rdpo_fn(inputs: PreferenceLogps, params: RDPOParams, normalizer: MarginNormalizer | None = None) -> LossOutput:
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
    rc, rr = require_reference(pc, rc, rr, "rdpo")
    r_w, r_l = pc - rc, pr - rr
    length_term = params.alpha * (inputs.chosen_lengths.to(pc.dtype) - inputs.rejected_lengths.to(pc.dtype))
    losses = -F.logsigmoid(params.beta * (r_w - r_l) + length_term)
    return LossOutput(
        losses=losses,
        chosen_rewards=(params.beta * r_w).detach(),
        rejected_rewards=(params.beta * r_l).detach(),
        margins=(-length_term / params.beta).detach(),
    )


# -- shared by the methods above ------------------------------------------------------------------


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


def _global_mean(x: Tensor) -> Tensor:
    """Detached mean of ``x`` over every data-parallel rank (Σ and count all-reduced, so unequal
    per-rank sizes are weighted by their counts); the local mean outside torch.distributed."""
    x = x.detach().reshape(-1)
    total = torch.stack([x.to(torch.float64).sum(), torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).to(x.dtype)
