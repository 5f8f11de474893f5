"""Scoring held-out pairs: per-pair policy and reference log-probs, and the preference report
built from them (shared by training, `alphadpo eval preference` and `alphadpo margins`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import PairCollator
from ..data import TokenizedSplit
from .sequence import SequenceLogps
from ..models.loading import reference_mode


@dataclass
class PairScores:
    """Per-pair sums and token counts, [N] float64, in the order of the tokenised split."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@torch.no_grad()
def _score(network, split: TokenizedSplit, pad_id: int, batch_size: int, device, progress=None):
    scorer = SequenceLogps(network)
    collate = PairCollator(pad_id)
    n = len(split)
    sums = torch.zeros(2, n, dtype=torch.float64)
    counts = torch.zeros(2, n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        batch = collate([split.dataset[i] for i in idx])
        s, c = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device))
        b = len(idx)
        sums[0, idx], sums[1, idx] = s[:b].double().cpu(), s[b:].double().cpu()
        counts[0, idx], counts[1, idx] = c[:b].double().cpu(), c[b:].double().cpu()
        if progress is not None:
            progress(idx[-1] + 1, n)
    return sums, counts


def score_split(models, split: TokenizedSplit, ref=None, *, batch_size: int = 8, device=None,
                with_reference: bool = True, progress=None) -> PairScores:
    """Policy scores, and reference scores from `ref` (precomputed) or from the reference network."""
    policy = models.policy
    device = device or next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    try:
        sums, counts = _score(policy, split, models.tokenizer.pad_token_id, batch_size, device, progress)
        scores = PairScores(sums[0], sums[1], counts[0], counts[1])
        if with_reference:
            if ref is not None:
                scores.ref_chosen, scores.ref_rejected = ref.chosen_sum.clone(), ref.rejected_sum.clone()
            elif models.reference is not None or hasattr(policy, "disable_adapter"):
                with reference_mode(policy, models.reference) as net:
                    rsums, _ = _score(net, split, models.tokenizer.pad_token_id, batch_size, device)
                scores.ref_chosen, scores.ref_rejected = rsums[0], rsums[1]
    finally:
        policy.train(was_training)
    return scores


def _win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of pairs ranked correctly, ties counting one half (before training the
    reference-relative rewards are all exactly 0)."""
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


def report_from_scores(s: PairScores) -> dict:
    avg_c, avg_r = s.policy_chosen / s.chosen_len, s.policy_rejected / s.rejected_len
    report = {
        "pairs": int(avg_c.numel()),
        # The implicit SimPO/α-DPO reward: the length-normalised log-likelihood.
        "accuracy": _win_rate(avg_c, avg_r),
        "reward_margin": (avg_c - avg_r).mean().item(),
        "logps_chosen": avg_c.mean().item(),
        "logps_rejected": avg_r.mean().item(),
        "length_chosen": s.chosen_len.mean().item(),
        "length_rejected": s.rejected_len.mean().item(),
        "accuracy_ref": None,
    }
    if s.ref_chosen is not None:
        rc, rr = s.policy_chosen - s.ref_chosen, s.policy_rejected - s.ref_rejected
        report["accuracy_ref"] = _win_rate(rc, rr)
        report["ref_reward_margin"] = (rc - rr).mean().item()
        # Per-token log-ratio on the data's responses: a cheap drift estimate (not a sampled KL).
        report["logratio_per_token"] = ((rc + rr) / (s.chosen_len + s.rejected_len)).mean().item()
    return report


def preference_report(models, split: TokenizedSplit, ref=None, *, batch_size: int = 8, device=None) -> dict:
    scores = score_split(models, split, ref, batch_size=batch_size, device=device)
    return report_from_scores(scores)
