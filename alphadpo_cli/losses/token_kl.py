"""TDPO's token-level KL along a response: the input of the ``alpha_dpo_token_kl`` ablation (its δ,
see :func:`alphadpo_cli.losses.alpha_dpo.alpha_dpo_margin_input`)."""

from __future__ import annotations

import torch
from torch import Tensor


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
