"""The one per-pair scoring path: a split's pairs scored under one network.

`score_pairs` runs a network (the policy, the policy with its adapters disabled, or a separate
reference) over every pair of a tokenised split, padded or packed, and returns one
`PreferenceLogps` in split order: per-pair response log-prob sums and token counts. Training
(reference precompute), `alphadpo eval preference` and `alphadpo margins` all score through it;
`score_with_reference` adds the reference terms, and `preference_report` turns the result into
the held-out metrics every one of them prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from ..data import TokenizedSplit
from ..kernels.segment_attention import segment_attention_installed
from ..losses.types import PreferenceLogps
from ..models.adapters import reference_mode
from .layouts import PackedPairCollator, PairCollator, packed_length, token_budget_batches
from .sequence import SequenceLogps, scorer_inputs


@dataclasses.dataclass(frozen=True)
class ScoringLayout:
    """How `score_pairs` cuts a split into forwards (its keywords, as one value). Packed: one
    padding-free row per `token_budget` tokens, the prompt shared by chosen and rejected with
    `prefix_sharing`; else `batch_size` padded pairs per forward, `longest_first` or in split order.
    `chunk_size`: response tokens per LM-head chunk (None: auto)."""

    packed: bool = False
    token_budget: int = 8192
    prefix_sharing: bool = True
    batch_size: int = 8
    longest_first: bool = False
    chunk_size: int | None = None

    @classmethod
    def of_training(cls, training, batch_size: int) -> "ScoringLayout":
        """The layout of a training run (`config.TrainingConfig`): packed when it packs (the reference
        precompute and the held-out reports score as the training forward does), else padded longest
        first, `batch_size` pairs per forward."""
        return cls(packed=bool(training.packing), token_budget=training.token_budget,
                   prefix_sharing=training.prefix_sharing, batch_size=batch_size, longest_first=True,
                   chunk_size=training.logprob_chunk_size or None)

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def _batches(split: TokenizedSplit, *, packed: bool, prefix_sharing: bool, token_budget: int, batch_size: int,
             longest_first: bool) -> list[list[int]]:
    """Positions of the pairs of each forward. Packed: grouped longest first within `token_budget` tokens.
    Padded: `batch_size` pairs, in split order or longest first (similar lengths waste less padding)."""
    ds = split.dataset
    prompts, chosens, rejecteds = ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]
    if packed:
        lengths = [packed_length(len(p), len(c), len(r), prefix_sharing) for p, c, r in zip(prompts, chosens, rejecteds)]
        return token_budget_batches(lengths, token_budget)
    order = list(range(len(prompts)))
    if longest_first:
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosens, rejecteds)]
        order.sort(key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_pairs(
    network: torch.nn.Module,
    split: TokenizedSplit,
    *,
    pad_token_id: int = 0,
    packed: bool = False,
    prefix_sharing: bool = True,
    token_budget: int = 8192,
    batch_size: int = 8,
    longest_first: bool = False,
    chunk_size: int | None = None,
    device=None,
    progress: Callable[[int, int], None] | None = None,
) -> PreferenceLogps:
    """Per-pair sums and token counts of `network` over `split`: [N] float64 on the CPU, in split order,
    in the ``policy_*`` fields (whatever the network is: see `PreferenceLogps.with_reference`).

    Padded: `PairCollator` rows, `batch_size` pairs per forward. Packed: one padding-free
    `PackedPairCollator` row per `token_budget` tokens (without gradients nothing is kept for
    backward, so one row can hold many pairs: the budget bounds one layer's activations).
    `progress(done, total)` is called after every forward. Packed: the segment kernels are installed for
    the duration of the call (`segment_attention_installed`) unless they already were, so the network
    is left as it was found.
    """
    device = device or next(network.parameters()).device
    scorer = SequenceLogps(network, chunk_size=chunk_size or None)
    collate = PackedPairCollator(prefix_sharing=prefix_sharing) if packed else PairCollator(pad_token_id)
    n = len(split)
    sums = torch.zeros(2, n, dtype=torch.float64)
    counts = torch.zeros(2, n, dtype=torch.float64)
    done = 0
    with segment_attention_installed(network) if packed else contextlib.nullcontext():
        for idx in _batches(split, packed=packed, prefix_sharing=prefix_sharing, token_budget=token_budget,
                            batch_size=batch_size, longest_first=longest_first):
            batch = scorer_inputs(collate([split.dataset[i] for i in idx]))
            s, c = scorer(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            b, ix = len(idx), torch.tensor(idx)
            sums[0, ix], sums[1, ix] = s[:b].double().cpu(), s[b:].double().cpu()
            counts[0, ix], counts[1, ix] = c[:b].double().cpu(), c[b:].double().cpu()
            done += b
            if progress is not None:
                progress(done, n)
    return PreferenceLogps(sums[0], sums[1], counts[0], counts[1])


def score_with_reference(policy: torch.nn.Module, split: TokenizedSplit, *, reference: torch.nn.Module | None = None,
                         reference_scores: PreferenceLogps | None = None, with_reference: bool = True,
                         pad_token_id: int = 0, batch_size: int = 8, device=None,
                         progress: Callable[[int, int], None] | None = None,
                         layout: ScoringLayout | None = None) -> PreferenceLogps:
    """The policy's scores (in eval mode) with the reference terms: `reference_scores` when given
    (precomputed, e.g. from the cache), else scored under `reference`, else under the policy with its
    adapters disabled; none when `with_reference` is false or there is no reference at all. Cut into
    forwards by `layout` (a training run's: `ScoringLayout.of_training`), else `batch_size` padded
    pairs in split order."""
    device = device or next(policy.parameters()).device
    layout = layout or ScoringLayout(batch_size=batch_size)
    kw = dict(pad_token_id=pad_token_id, device=device, **layout.kwargs())
    was_training = policy.training
    policy.eval()
    try:
        scores = score_pairs(policy, split, progress=progress, **kw)
        if not with_reference:
            return scores
        if reference_scores is None and (reference is not None or hasattr(policy, "disable_adapter")):
            with reference_mode(policy, reference) as net:
                reference_scores = score_pairs(net, split, **kw)
        return scores.with_reference(reference_scores)
    finally:
        policy.train(was_training)


def _win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of pairs ranked correctly, ties counting one half (before training the
    reference-relative rewards are all exactly 0)."""
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


def preference_report(s: PreferenceLogps) -> dict:
    """Held-out preference metrics of scored pairs (policy, and reference-relative when present)."""
    avg_c, avg_r = s.policy_chosen_avg, s.policy_rejected_avg
    report = {
        "pairs": int(avg_c.numel()),
        # The implicit SimPO/α-DPO reward: the length-normalised log-likelihood.
        "accuracy": _win_rate(avg_c, avg_r),
        "reward_margin": (avg_c - avg_r).mean().item(),
        "logps_chosen": avg_c.mean().item(),
        "logps_rejected": avg_r.mean().item(),
        "length_chosen": s.chosen_lengths.mean().item(),
        "length_rejected": s.rejected_lengths.mean().item(),
        "accuracy_ref": None,
    }
    if s.has_reference:
        rc, rr = s.policy_chosen_logps - s.ref_chosen_logps, s.policy_rejected_logps - s.ref_rejected_logps
        report["accuracy_ref"] = _win_rate(rc, rr)
        report["ref_reward_margin"] = (rc - rr).mean().item()
        # Per-token log-ratio on the data's responses: a cheap drift estimate (not a sampled KL).
        report["logratio_per_token"] = ((rc + rr) / (s.chosen_lengths + s.rejected_lengths)).mean().item()
    return report
