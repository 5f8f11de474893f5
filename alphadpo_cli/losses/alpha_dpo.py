"""α-DPO: SimPO's logit minus an adaptive, per-pair reward margin.

Wu et al., *α-DPO: Adaptive Reward Margin is What Direct Preference Optimization Needs* (eq. 9-12;
the implicit reference π̂ref = U·(πθ/πref)^α). In code scale, on length-averaged log-probs
``p̄ = Σ_t log π / |y|``::

    Δθ = p̄θ(w) − p̄θ(l)           Δref = p̄ref(w) − p̄ref(l)
    g  = Δθ − Δref  (detached)      z = normaliser(g)
    m  = sg(gamma_beta_ratio + α·z)
    L  = −(1−ε)·logσ(β(Δθ − m)) − ε·logσ(−β(Δθ − m))

so the logit is ``β·Δθ − γ − α·β·z`` with ``γ = β·gamma_beta_ratio``; α = 0 is exactly SimPO.
``z`` is :class:`~alphadpo_cli.losses.normalizer.MarginNormalizer`'s z-score of g (the paper's M,
eq. 11): in training (default "ema") with the statistics of the earlier optimiser steps' global
batches, z = 0 at step 1. ``margins`` in the output are ``m`` per pair: the target margin in ratio
units; the metrics ``normalizer/mu`` and ``normalizer/sigma`` are the μ, σ this call used.

This file holds the formula (:func:`_alpha_dpo_core`, pure: μ, σ are its inputs), the stand-alone entry point for other
people's trainers (:func:`alpha_dpo_loss`), the registry's entry (:func:`alpha_dpo_fn`), the
hyperparameters (:class:`AlphaDPOParams`) and the paper's ablations, one row each of
:data:`ABLATIONS`. The baselines are in ``baselines.py``, the registry in ``registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..stats import summary_stats
from .common import LossMetrics, require_reference, sigmoid_loss
from .normalizer import NORMALIZER_MODES, MarginNormalizer, resolve_normalizer
from .normalizer_state import normalize
from .params import LossParams
from .types import AlphaDPOOutput, LossOutput, PreferenceLogps

#: The implicit reference π̂ref = U·X^α; what X is (the margin source M = log X(w) − log X(l)).
REFERENCE_VARIANTS = ("ratio", "policy", "reference", "inverse_reference")
MARGIN_SOURCES = ("sequence", "token_kl")


def _alpha_dpo_core(
    pc: Tensor,
    pr: Tensor,
    log_x: tuple[Tensor, Tensor],
    g: Tensor,
    mu: Tensor,
    sigma: Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    label_smoothing: float,
    stop_gradient: bool = True,
) -> LossOutput:
    """The α-DPO formula, on already reduced (averaged or summed) log-probs, given the discrepancy
    ``g`` and the statistics ``mu``, ``sigma`` it is z-scored with (a pure function: no state)."""
    z = normalize(g, mu, sigma)
    margin = gamma_beta_ratio + alpha * z
    if stop_gradient:
        margin = margin.detach()
    losses = sigmoid_loss(beta * (pc - pr - margin), label_smoothing)
    log_x_c, log_x_r = log_x
    metrics = {
        **summary_stats("margin", margin),
        "normalizer/mu": mu,
        "normalizer/sigma": sigma,
        "g/mean": g.detach().to(torch.float64).mean(),
        "z/mean": z.detach().to(torch.float64).mean(),
    }
    return LossOutput(
        losses=losses,
        # β·(log πθ(y) − α·log X(y)); for "ratio" this is exactly what the authors log.
        chosen_rewards=(beta * (pc - alpha * log_x_c)).detach(),
        rejected_rewards=(beta * (pr - alpha * log_x_r)).detach(),
        margins=margin.detach(),
        metrics=LossMetrics(metrics),
    )


def _alpha_dpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    normalizer: MarginNormalizer,
    stop_gradient: bool = True,
    reference_variant: str = "ratio",
    margin_input: Tensor | None = None,
    **hyper: float,
) -> LossOutput:
    """g from the log-probs (``margin_input`` overrides it: TDPO δ ablation), the normaliser's one
    state transition (:meth:`MarginNormalizer.observe`, giving μ, σ), then :func:`_alpha_dpo_core`."""
    if rc is not None:
        rc = rc.detach()
    if rr is not None:
        rr = rr.detach()
    log_x_c, log_x_r = _implicit_reference_log_x(pc, pr, rc, rr, reference_variant)
    g = (log_x_c - log_x_r) if margin_input is None else margin_input
    if stop_gradient:
        g = g.detach()
    mu, sigma = normalizer.observe(g)
    return _alpha_dpo_core(pc, pr, (log_x_c, log_x_r), g, mu, sigma, stop_gradient=stop_gradient, **hyper)


def _implicit_reference_log_x(
    pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, variant: str
) -> tuple[Tensor, Tensor]:
    """log X(y_w), log X(y_l) of the implicit reference π̂ref = U·X^α (:data:`REFERENCE_VARIANTS`):
    "ratio" X = πθ/πref (α-DPO), "policy" X = πθ, "reference" X = πref, "inverse_reference" X = 1/πref."""
    if variant == "policy":
        return pc, pr
    if variant not in REFERENCE_VARIANTS:
        raise ValueError(f"unknown reference_variant {variant!r}; valid: {list(REFERENCE_VARIANTS)}")
    rc, rr = require_reference(pc, rc, rr, f"reference_variant={variant!r}")
    if variant == "ratio":
        return pc - rc, pr - rr
    if variant == "reference":
        return rc, rr
    return -rc, -rr  # inverse_reference


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
    evaluation). Called outside ``normalizer.begin_step()`` … ``end_step()``
    each call is a step of its own (statistics updated from this batch, gathered
    over the ranks, then used); between them, as in ``alphadpo train``, the
    call is normalised with the statistics of the earlier steps and its g is
    pooled into the step's update. ``None`` z-scores g with this batch's own
    local statistics (stateless, no cross-rank communication; σ floored at
    1e-3, the :class:`MarginNormalizer` default ``eps``).

    Returns a :class:`LossOutput`: per-pair ``losses`` (take ``.mean()``),
    detached ``chosen_rewards``/``rejected_rewards`` (β·(p̄θ − α·(p̄θ − p̄ref)),
    as the authors log them) and ``margins`` m_i = gamma_beta_ratio + α·z_i.
    """
    return _alpha_dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=float(beta),
        gamma_beta_ratio=float(gamma_beta_ratio),
        alpha=float(alpha),
        label_smoothing=float(label_smoothing),
        normalizer=resolve_normalizer(None, normalizer),
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


def alpha_dpo_fn(
    inputs: PreferenceLogps, params: AlphaDPOParams, normalizer: MarginNormalizer | None = None
) -> LossOutput:
    """α-DPO and its ablations (registry entry). margins: gamma_beta_ratio + α·z."""
    pc, pr, rc, rr = inputs.reduced(params.length_normalized)
    return _alpha_dpo(
        pc,
        pr,
        rc,
        rr,
        beta=params.beta,
        gamma_beta_ratio=params.gamma_beta_ratio,
        alpha=params.alpha,
        label_smoothing=params.label_smoothing,
        normalizer=resolve_normalizer(params.normalization, normalizer),
        stop_gradient=params.stop_gradient,
        reference_variant=params.reference_variant,
        margin_input=alpha_dpo_margin_input(inputs, params),
    )


@dataclass
class AlphaDPOParams(LossParams):
    """α-DPO hyperparameters (code scale).

    Defaults: β = 2.5 and α = 0.05 as in the Mistral-Instruct setting and the
    paper's recommended α; gamma_beta_ratio = 0.5 is mid-range (the paper's
    Table 4 "γ" column is this ratio: 0.15–0.6). Presets override them.

    * ``normalization`` (see :class:`MarginNormalizer`): "ema" (default,
      bias-corrected EMA of each optimiser step's global batch — all micro-batches
      and processes pooled, one update per step, used from the next step on, z = 0
      at step 1), "batch" (the previous step's global batch alone), "none" (w/o
      normalisation: m = γ/β + α·g raw), "official" (the authors' exact EMA,
      updated from every micro-batch gathered over the processes, before it is
      normalised: depends on the per-device batch and the number of processes).
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
      (their setting: 4 per device); each is one update ("ema": one step, normalised with
      the statistics before it).
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


#: α-DPO and the paper's ablations: registry name → the :class:`AlphaDPOParams` defaults it changes.
#: Same fields and function for all of them; the registry (``registry.py``) builds one row each.
ABLATIONS: dict[str, dict[str, Any]] = {
    "alpha_dpo": {},
    "alpha_dpo_no_norm": dict(normalization="none"),  # w/o normalisation: m = γ/β + α·M raw
    "alpha_dpo_batch_norm": dict(normalization="batch"),  # per-batch, not EMA, z-scoring
    # The authors' code exactly: their EMA (no bias correction, no floor) and evaluation batches
    # that update it.
    "alpha_dpo_official": dict(normalization="official", eval_updates_stats=True),
    "alpha_dpo_no_sg": dict(stop_gradient=False),  # margin without stop-gradient
    "alpha_dpo_no_gamma": dict(gamma_beta_ratio=0.0),  # γ = 0
    "alpha_dpo_policy_ref": dict(reference_variant="policy"),  # π̂ref = U·πθ^α (M = Δθ)
    "alpha_dpo_ref_ref": dict(reference_variant="reference"),  # π̂ref = U·πref^α (M = Δref)
    "alpha_dpo_inv_ref": dict(reference_variant="inverse_reference"),  # π̂ref = U·(1/πref)^α (M = −Δref)
    "alpha_dpo_sum": dict(length_normalized=False),  # summed log-probs (App. B.2)
    "alpha_dpo_token_kl": dict(margin_source="token_kl"),  # TDPO's token-level δ instead of M (App. B.4)
}
