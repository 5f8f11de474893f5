"""The per-pair type every method, trainer, cache and evaluation shares, and the loss output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from torch import Tensor

# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------

_AVERAGEABLE = {
    "policy_chosen": ("policy_chosen_logps", "chosen_lengths"),
    "policy_rejected": ("policy_rejected_logps", "rejected_lengths"),
    "ref_chosen": ("ref_chosen_logps", "chosen_lengths"),
    "ref_rejected": ("ref_rejected_logps", "rejected_lengths"),
    "chosen_seq_kl": ("chosen_seq_kl", "chosen_lengths"),
    "rejected_seq_kl": ("rejected_seq_kl", "rejected_lengths"),
}


@dataclass
class PreferenceLogps:
    """Per-sequence log-probabilities of a batch of B preference pairs (every field shape [B]).

    ``*_logps`` are SUMS over the response tokens (prompt masked). Reference
    log-probs should be detached (they are detached again where used).
    ``chosen_seq_kl``/``rejected_seq_kl`` are Σ_t KL(πref‖πθ) along each
    response (see :func:`sequence_kl`), only needed by the TDPO-δ ablation.
    Lengths must be > 0 (not checked, to avoid a device sync).
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_seq_kl: Tensor | None = None
    rejected_seq_kl: Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.policy_chosen_logps.shape
        if len(shape) != 1:
            raise ValueError(f"policy_chosen_logps must have shape [B], got {tuple(shape)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if not isinstance(v, Tensor):
                raise TypeError(f"{f.name} must be a torch.Tensor, got {type(v).__name__}")
            if v.shape != shape:
                raise ValueError(f"{f.name} has shape {tuple(v.shape)}, expected {tuple(shape)}")

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None and self.ref_rejected_logps is not None

    @property
    def has_token_kl(self) -> bool:
        return self.chosen_seq_kl is not None and self.rejected_seq_kl is not None

    def averaged(self, which: str) -> Tensor:
        """Mean-per-token value of ``which`` ∈ policy_chosen, policy_rejected,
        ref_chosen, ref_rejected, chosen_seq_kl, rejected_seq_kl."""
        try:
            value_name, length_name = _AVERAGEABLE[which]
        except KeyError:
            raise ValueError(f"averaged(): unknown field {which!r}; valid: {sorted(_AVERAGEABLE)}") from None
        value = getattr(self, value_name)
        if value is None:
            raise ValueError(f"averaged({which!r}): {value_name} is None")
        lengths = getattr(self, length_name)
        return value / lengths.to(value.dtype)

    @property
    def policy_chosen_avg(self) -> Tensor:
        return self.averaged("policy_chosen")

    @property
    def policy_rejected_avg(self) -> Tensor:
        return self.averaged("policy_rejected")

    @property
    def ref_chosen_avg(self) -> Tensor:
        return self.averaged("ref_chosen")

    @property
    def ref_rejected_avg(self) -> Tensor:
        return self.averaged("ref_rejected")

    def select(self, index) -> "PreferenceLogps":
        """The pairs at `index` (a long tensor of positions, or a slice), every present field."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index]
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})

    def to(self, device=None, dtype=None) -> "PreferenceLogps":
        """Every present field moved to `device` and/or cast to `dtype`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})

    def with_reference(self, reference: "PreferenceLogps | None") -> "PreferenceLogps":
        """These scores with `reference`'s as the reference terms.

        One network's scores (what `alphadpo_cli.logps.scoring.score_pairs` returns, and what the
        reference cache stores) sit in the ``policy_*`` fields; scoring the reference network gives
        the same type, whose ``policy_*`` become the ``ref_*`` here. None leaves the reference out."""
        if reference is None:
            return dataclasses.replace(self, ref_chosen_logps=None, ref_rejected_logps=None)
        return dataclasses.replace(self, ref_chosen_logps=reference.policy_chosen_logps,
                                   ref_rejected_logps=reference.policy_rejected_logps)

    def reduced(self, length_normalized: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(policy_chosen, policy_rejected, ref_chosen, ref_rejected), averaged or summed.
        Reference entries are None when absent and are returned detached."""
        if length_normalized:
            pc, pr = self.policy_chosen_avg, self.policy_rejected_avg
            rc = self.ref_chosen_avg if self.ref_chosen_logps is not None else None
            rr = self.ref_rejected_avg if self.ref_rejected_logps is not None else None
        else:
            pc, pr = self.policy_chosen_logps, self.policy_rejected_logps
            rc, rr = self.ref_chosen_logps, self.ref_rejected_logps
        return pc, pr, (None if rc is None else rc.detach()), (None if rr is None else rr.detach())


@dataclass
class LossOutput:
    """Result of a preference loss; every tensor has shape [B].

    ``margins`` is the target margin in ratio units (see each method's
    docstring); rewards and margins are detached. ``metrics`` maps names to
    detached 0-d tensors that read as Python floats (`losses.common.LossMetrics`:
    converted on first read, in one device sync, so a trainer that never reads
    them never waits for the device).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def reward_margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def loss(self) -> Tensor:
        """Scalar mean loss (what a trainer back-propagates)."""
        return self.losses.mean()


#: Return type of :func:`alpha_dpo_loss` (the same named structure as every method's).
AlphaDPOOutput = LossOutput


