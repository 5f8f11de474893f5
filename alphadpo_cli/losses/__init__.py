"""Preference losses: α-DPO, its paper ablations, and the paper's baselines.

Read ``alpha_dpo.py`` first: the α-DPO formula, its stand-alone entry point :func:`alpha_dpo_loss`
and its ablations (one table). Then ``normalizer_state.py`` (the margin's z-scoring as pure functions
of a frozen state) and ``normalizer.py`` (the thin holder a trainer keeps), ``baselines.py`` (SimPO,
DPO, IPO, CPO, KTO, ORPO, R-DPO), ``registry.py`` (:data:`LOSSES`, :func:`compute_loss`) and
``types.py`` (the per-pair inputs and the output).

Everything here is a pure function of per-sequence log-probabilities. The only state is the
margin normaliser's :class:`NormalizerState`, which the caller owns (in a :class:`MarginNormalizer`)
and passes in.

Conventions
-----------
* Inputs are per-sequence *summed* log-probabilities of the response tokens
  (:class:`PreferenceLogps`); each method averages them itself when it is
  length-normalised (``logp̄ = Σ_t log π / |y|``).
* Every method returns a :class:`LossOutput` with per-pair ``losses`` (the
  trainer takes ``.mean()``), detached ``chosen_rewards``/``rejected_rewards``,
  and detached ``margins``: the *target margin in ratio units*, i.e. the
  quantity ``m`` such that the method's logit reads ``β·(Δθ − m)`` (documented
  per method). ``metrics`` (extra logging values) are kept as tensors and read as
  floats on first access: the loss itself never syncs the device.
* ``LOSSES`` is the registry read by the trainer and the CLI;
  :func:`get_loss`, :func:`make_params` and :func:`compute_loss` are the
  helpers around it. :func:`alpha_dpo_loss` is the stand-alone entry point for
  other people's trainers.
"""

from __future__ import annotations

from .alpha_dpo import AlphaDPOParams, alpha_dpo_loss
from .baselines import CPOParams, DPOParams, IPOParams, KTOParams, ORPOParams, RDPOParams, SimPOParams
from .normalizer import NORMALIZER_MODES, MarginNormalizer
from .normalizer_state import NormalizerConfig, NormalizerState
from .registry import (LOSSES, LossMethod, Requirements, UnknownLossError, compute_loss, get_loss, make_normalizer,
                       make_params, requirements)
from .token_kl import sequence_kl
from .types import AlphaDPOOutput, LossOutput, PreferenceLogps

__all__ = [
    "PreferenceLogps",
    "LossOutput",
    "AlphaDPOOutput",
    "LossMethod",
    "UnknownLossError",
    "MarginNormalizer",
    "NORMALIZER_MODES",
    "NormalizerConfig",
    "NormalizerState",
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
    "requirements",
    "Requirements",
    "compute_loss",
    "alpha_dpo_loss",
    "sequence_kl",
]
