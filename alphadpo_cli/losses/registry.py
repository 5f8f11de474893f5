"""THE registry of loss methods (:data:`LOSSES`), read by the trainer and the CLI, and its helpers.

A row names the method's function, its params dataclass, the defaults this row changes (an
ablation is a row, not a subclass) and what the method needs from the caller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..config.errors import UserError
from ..values import did_you_mean
from .alpha_dpo import ABLATIONS, AlphaDPOParams, alpha_dpo_fn
from .baselines import (
    CPOParams,
    DPOParams,
    IPOParams,
    KTOParams,
    ORPOParams,
    RDPOParams,
    SimPOParams,
    cpo_fn,
    dpo_fn,
    ipo_fn,
    kto_fn,
    orpo_fn,
    rdpo_fn,
    simpo_fn,
)
from .normalizer import MarginNormalizer
from .types import LossOutput, PreferenceLogps


class UnknownLossError(UserError, ValueError):
    """Raised for a loss name that is not in :data:`LOSSES`."""


@dataclass(frozen=True, kw_only=True)
class LossMethod:
    """One registered method.

    * ``fn(inputs, params, normalizer) → LossOutput`` and ``params_cls``, its hyperparameters;
    * ``defaults``: the ``params_cls`` defaults this row changes (:func:`make_params` applies them);
    * ``needs_reference``: the reference log-probs are used (skip the reference forward if False);
    * ``length_normalized``: averaged (True) or summed log-probs; ``uses_chosen_nll``: an NLL term
      on the chosen response; ``needs_token_kl``: ``chosen_seq_kl``/``rejected_seq_kl``
      (:func:`sequence_kl`); ``uses_normalizer``: a :class:`MarginNormalizer` (:func:`make_normalizer`).

    These flags describe the row with its own defaults (the ``alphadpo losses`` table). What a run
    needs depends on the parameters it resolves (``loss.params.reference_variant=policy`` makes
    ``alpha_dpo`` reference-free): callers ask :func:`requirements` with them.
    """

    name: str
    fn: Callable[..., LossOutput]
    params_cls: type
    description: str
    needs_reference: bool
    length_normalized: bool
    uses_chosen_nll: bool = False
    needs_token_kl: bool = False
    uses_normalizer: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


@dataclass(frozen=True)
class Requirements:
    """What one method with its resolved parameters needs from the caller (see :func:`requirements`).

    * ``needs_reference``: the loss reads the reference log-probs (prepare them: precomputed or online);
    * ``needs_token_kl``: ``chosen_seq_kl``/``rejected_seq_kl`` (TDPO's δ; the reference runs online);
    * ``uses_normalizer``: it keeps a :class:`MarginNormalizer` (:func:`make_normalizer`);
    * ``length_normalized``: averaged (True) or summed log-probs;
    * ``uses_chosen_nll``: an NLL term on the chosen response.
    """

    needs_reference: bool
    needs_token_kl: bool
    uses_normalizer: bool
    length_normalized: bool
    uses_chosen_nll: bool = False


def _alpha_requirements(p: AlphaDPOParams) -> Requirements:
    """An α-DPO-family method's needs, from its parameters: the implicit reference's X decides
    whether πref is read (``reference_variant="policy"`` does not; TDPO's δ always does)."""
    token_kl = p.margin_source == "token_kl"
    return Requirements(needs_reference=p.reference_variant != "policy" or token_kl, needs_token_kl=token_kl,
                        uses_normalizer=p.normalization != "none", length_normalized=p.length_normalized)


def _alpha(name: str, description: str) -> LossMethod:
    """A row of the α-DPO family: its :data:`ABLATIONS` defaults decide what it needs."""
    req = _alpha_requirements(AlphaDPOParams(**ABLATIONS[name]))
    return LossMethod(
        name=name,
        fn=alpha_dpo_fn,
        params_cls=AlphaDPOParams,
        defaults=ABLATIONS[name],
        description=description,
        needs_reference=req.needs_reference,
        length_normalized=req.length_normalized,
        needs_token_kl=req.needs_token_kl,
        uses_normalizer=req.uses_normalizer,
    )


_METHODS = [
    _alpha("alpha_dpo", "α-DPO: SimPO logit minus a detached, z-scored adaptive margin γ/β + α·z(M)"),
    _alpha("alpha_dpo_no_norm", "α-DPO ablation: no z-normalisation (m = γ/β + α·M raw)"),
    _alpha("alpha_dpo_batch_norm", "α-DPO with per-batch (not EMA) z-scoring"),
    _alpha("alpha_dpo_official", "α-DPO with the authors' exact EMA (no bias correction/eps)"),
    _alpha("alpha_dpo_no_sg", "α-DPO ablation: margin without stop-gradient"),
    _alpha("alpha_dpo_no_gamma", "α-DPO ablation: γ = 0"),
    _alpha("alpha_dpo_policy_ref", "α-DPO ablation: implicit reference U·πθ^α (M = Δθ)"),
    _alpha("alpha_dpo_ref_ref", "α-DPO ablation: implicit reference U·πref^α (M = Δref)"),
    _alpha("alpha_dpo_inv_ref", "α-DPO ablation: implicit reference U·(1/πref)^α (M = −Δref)"),
    _alpha("alpha_dpo_sum", "α-DPO without length normalisation (summed log-probs, App. B.2)"),
    _alpha("alpha_dpo_token_kl", "α-DPO with TDPO's token-level δ instead of M (App. B.4)"),
    LossMethod(name="simpo", fn=simpo_fn, params_cls=SimPOParams,
               needs_reference=False, length_normalized=True,
               description="SimPO: −logσ(βΔθ − γ) on averaged log-probs, optional SFT term"),
    LossMethod(name="simpo_sum", fn=simpo_fn, params_cls=SimPOParams, defaults=dict(length_normalized=False),
               needs_reference=False, length_normalized=False,
               description="SimPO without length normalisation (App. B.2)"),
    LossMethod(name="dpo", fn=dpo_fn, params_cls=DPOParams,
               needs_reference=True, length_normalized=False,
               description="DPO (sigmoid) on summed log-probs, optional label smoothing"),
    LossMethod(name="ipo", fn=ipo_fn, params_cls=IPOParams,
               needs_reference=True, length_normalized=True,
               description="IPO: (h − 1/(2τ))² on length-averaged log-ratios (TRL convention)"),
    LossMethod(name="cpo", fn=cpo_fn, params_cls=CPOParams,
               needs_reference=False, length_normalized=False, uses_chosen_nll=True,
               description="CPO: −logσ(β(log πθ(w) − log πθ(l))) + NLL(chosen); no reference"),
    LossMethod(name="kto", fn=kto_fn, params_cls=KTOParams,
               needs_reference=True, length_normalized=False,
               description="KTO on paired data: mean over the 2B examples, cross-half batch KL estimate z_ref "
                           "(all-reduced)"),
    LossMethod(name="orpo", fn=orpo_fn, params_cls=ORPOParams,
               needs_reference=False, length_normalized=True, uses_chosen_nll=True,
               description="ORPO: NLL(chosen) − λ·logσ(log-odds ratio); no reference"),
    LossMethod(name="rdpo", fn=rdpo_fn, params_cls=RDPOParams,
               needs_reference=True, length_normalized=False,
               description="R-DPO: DPO plus a length-difference term α(|y_w| − |y_l|) in the logit "
                           "(R-DPO paper's sign)"),
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
    close = did_you_mean(name, valid)
    if close is not None:
        msg += f". Did you mean {close!r}?"
    raise UnknownLossError(msg)


def make_params(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The method's params dataclass with its row's defaults, updated by ``overrides``.

    Unknown keys raise ValueError naming the key, the method and the valid keys;
    numeric strings ("5e-2", as YAML 1.1 reads the authors' configs) become floats.
    """
    method = get_loss(name)
    overrides = dict(overrides or {})
    valid = [f.name for f in dataclasses.fields(method.params_cls)]
    for key in overrides:
        if key not in valid:
            msg = f"unknown parameter {key!r} for loss {name!r}; valid keys: {', '.join(valid)}"
            close = did_you_mean(key, valid)
            if close is not None:
                msg += f". Did you mean {close!r}?"
            raise ValueError(msg)
    return method.params_cls(**{**method.defaults, **overrides})


def requirements(name: str, params: Any = None) -> Requirements:
    """What method ``name`` needs with ``params`` as resolved (its dataclass, a dict of overrides, or
    None: the row's defaults): THE answer the trainer (reference precompute or online, token KL),
    the margin inspector and the evaluation ask, so that, say, ``alpha_dpo`` with
    ``reference_variant="policy"`` computes no reference and ``alpha_dpo_policy_ref`` with
    ``reference_variant="ratio"`` gets one. α-DPO's flags come from its parameters; the baselines'
    from their row (their length normalisation from ``params.length_normalized`` where they have it)."""
    method = get_loss(name)
    p = _as_params(method, params)
    if isinstance(p, AlphaDPOParams):
        return _alpha_requirements(p)
    return Requirements(needs_reference=method.needs_reference, needs_token_kl=method.needs_token_kl,
                        uses_normalizer=method.uses_normalizer,
                        length_normalized=bool(getattr(p, "length_normalized", method.length_normalized)),
                        uses_chosen_nll=method.uses_chosen_nll)


def make_normalizer(
    name: str, params: Any = None, *, momentum: float | None = None, eps: float | None = None,
    process_group: Any = None,
) -> MarginNormalizer | None:
    """The MarginNormalizer a trainer should keep for method ``name`` (None if it uses none).

    momentum and eps default to the params' ``normalizer_momentum`` and ``sigma_floor``."""
    method = get_loss(name)
    if not method.uses_normalizer and params is None:
        return None
    params = _as_params(method, params)
    mode = getattr(params, "normalization", None)
    if mode is None or mode == "none":
        return None
    if momentum is None:
        momentum = getattr(params, "normalizer_momentum", 0.9)
    if eps is None:
        eps = getattr(params, "sigma_floor", 1e-3)
    return MarginNormalizer(mode=mode, momentum=momentum, eps=eps, process_group=process_group)


def _as_params(method: LossMethod, params: Any) -> Any:
    """``params`` as the method's dataclass: None → its row's defaults, a dict → :func:`make_params`."""
    if params is None:
        return make_params(method.name)
    if isinstance(params, Mapping):
        return make_params(method.name, params)
    if isinstance(params, method.params_cls):
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
    params = _as_params(method, params)
    if requirements(name, params).needs_reference and not inputs.has_reference:
        raise ValueError(f"loss {name!r} needs ref_chosen_logps / ref_rejected_logps")
    return method.fn(inputs, params, normalizer)
