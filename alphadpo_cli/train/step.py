"""One optimiser step: the micro-batches' forward and backward, clipping, the non-finite check and
the optimiser/scheduler update (`step`), over a stream of micro-batches that runs epoch after epoch
(`epoch_batches`).

A micro-batch becomes per-sequence log-probs of the policy (`forward`), with the reference's next to
them: taken from the precomputed scores, or run online (a separate frozen model, or the policy with
its adapters disabled), and for TDPO's δ the token-level KL(πref‖πθ) from both forwards' hidden
states. The loss itself is the registry's (`Objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..logps.sequence import batch_tokens, response_token_kl, scorer_inputs
from ..losses import LossOutput, MarginNormalizer, PreferenceLogps, compute_loss
from ..models.adapters import adapter_free, reference_mode
from ..models.loading import LoadedModels
from .checkpoint import TrainerState
from .logging import gather_micro, step_metrics


@dataclass
class Objective:
    """The loss a step optimises: registry method `name` with its `params`; `needs_reference` (the
    method uses reference log-probs), `token_kl` (its margin is TDPO's δ, which needs the reference
    online), the margin normaliser it keeps (None without one), and `loss_fn`, the registry's
    `compute_loss` unless a caller injects another (called as ``loss_fn(name, inputs, params, normalizer)``)."""

    name: str
    params: Any
    needs_reference: bool
    token_kl: bool
    normalizer: MarginNormalizer | None = None
    loss_fn: Callable[..., LossOutput] = compute_loss

    def __call__(self, inputs: PreferenceLogps) -> LossOutput:
        return self.loss_fn(self.name, inputs, self.params, self.normalizer)

    @property
    def eval_updates_stats(self) -> bool:
        """α-DPO's eval_updates_stats: the held-out batches also run the loss and update the normaliser."""
        return bool(getattr(self.params, "eval_updates_stats", False))


@dataclass
class TrainParts:
    """What `accelerator.prepare` returned, and what a step needs next to it."""

    accelerator: Any
    models: LoadedModels
    scorer: Any  # SequenceLogps over the policy, as prepared (under DeepSpeed its engine)
    reference_scorer: Any  # the separate online reference's SequenceLogps (or engine), else None
    optimizer: Any
    scheduler: Any
    loader: Any
    trainable: list[torch.nn.Parameter]


@dataclass
class StepOutput:
    metrics: dict[str, float]
    finite: bool  # the update was applied (False: a non-finite loss or gradient norm, skipped)
    pairs: int  # pairs and tokens of all processes in this step
    tokens: int
    last_rows: torch.Tensor  # dataset rows of the step's last micro-batch (for error messages)


def epoch_batches(accelerator, loader, state: TrainerState) -> Iterator[dict]:
    """The loader's micro-batches epoch after epoch, from where `state` stands (on resume, the first
    `state.batches_in_epoch` batches of its epoch are skipped); keeps `state.epoch` and
    `state.batches_in_epoch` current. Endless: the loop decides when to stop."""
    while True:
        loader.set_epoch(state.epoch)
        skip = state.batches_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def step(parts: TrainParts, objective: Objective, batches: Iterator[dict], state: TrainerState, *,
         reference: PreferenceLogps | None, max_grad_norm: float | None) -> StepOutput:
    """One optimiser step over the next micro-batches of `batches`: as many as accelerate accumulates
    (fewer at an epoch's end). `reference`: the precomputed reference scores of the training split
    (None: run online, or a reference-free method). Counts the step in `state`."""
    acc = parts.accelerator
    micro, pairs, tokens = [], 0, 0
    for batch in batches:
        with acc.accumulate(parts.scorer):
            inputs = forward(parts, objective, batch, reference)
            out = objective(inputs)
            loss = out.losses.mean()
            acc.backward(loss)
            micro.append(gather_micro(acc, out, inputs, loss))
        pairs += int(inputs.chosen_lengths.shape[0]) * acc.num_processes
        tokens += batch_tokens(batch) * acc.num_processes
        if acc.sync_gradients:
            break
    # The norm is needed for the non-finite check even without clipping.
    clip = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    grad_norm = acc.clip_grad_norm_(parts.trainable, clip)
    finite = all(torch.isfinite(m["loss"]).all() for m in micro)
    if grad_norm is not None:
        finite = finite and bool(torch.isfinite(torch.as_tensor(grad_norm)))
    if finite:
        parts.optimizer.step()
        state.nonfinite_in_row = 0
    else:
        state.skipped_nonfinite += 1
        state.nonfinite_in_row += 1
    lr_used = parts.scheduler.get_last_lr()[0]
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    metrics = step_metrics(micro, grad_norm, lr_used, objective.normalizer)
    metrics["nonfinite_skipped"] = state.skipped_nonfinite
    return StepOutput(metrics, finite, pairs, tokens, last_rows=batch["index"])


def forward(parts: TrainParts, objective: Objective, batch: dict, reference: PreferenceLogps | None) -> PreferenceLogps:
    """The policy's per-sequence log-prob sums and token counts for one micro-batch (with gradient),
    with the reference's (and for TDPO's δ the token-level KL) detached next to them."""
    token_kl = objective.token_kl and reference is None  # (a precomputed `reference` never comes with the token KL)
    kw = {"return_hidden": True} if token_kl else {}
    out = parts.scorer(**scorer_inputs(batch), **kw)
    sums, counts = out[0], out[1]
    b = batch["index"].shape[0]
    ref_c = ref_r = kl = None
    if objective.needs_reference:
        if reference is not None:
            taken = reference.select(batch["index"].cpu()).to(sums.device, sums.dtype)
            ref_c, ref_r = taken.policy_chosen_logps, taken.policy_rejected_logps
        else:
            with torch.no_grad():
                ref_out = _reference_forward(parts, batch, kw)
                if token_kl:
                    kl = _token_kl(parts, out, ref_out, 2 * b)
            ref_c, ref_r = ref_out[0][:b].detach(), ref_out[0][b:].detach()
    return PreferenceLogps(
        policy_chosen_logps=sums[:b],
        policy_rejected_logps=sums[b:],
        chosen_lengths=counts[:b],
        rejected_lengths=counts[b:],
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        chosen_seq_kl=None if kl is None else kl[:b].to(sums.dtype),
        rejected_seq_kl=None if kl is None else kl[b:].to(sums.dtype),
    )


def _reference_forward(parts: TrainParts, batch: dict, kw: dict):
    """The online reference's outputs for `batch`: the separate reference, or the policy's own scorer
    with its adapters disabled."""
    if parts.models.reference is not None:
        return parts.reference_scorer(**scorer_inputs(batch), **kw)
    with reference_mode(parts.accelerator.unwrap_model(parts.models.policy)):
        return parts.scorer(**scorer_inputs(batch), **kw)


def _token_kl(parts: TrainParts, out, ref_out, num_sequences: int) -> torch.Tensor:
    """Σ_t KL(πref‖πθ) per sequence ([2B], no gradient) from the response hidden states both forwards
    returned, chunk by chunk through the two LM heads. An adapter-disabled reference uses the policy's
    head without its adapter (LoRA on the LM head); a separate reference, its own head."""
    acc = parts.accelerator
    policy_scorer = acc.unwrap_model(parts.scorer)
    head, softcap = policy_scorer.output_head()
    if parts.reference_scorer is not None:
        ref_head, _ = acc.unwrap_model(parts.reference_scorer).output_head()
    else:
        ref_head = adapter_free(head)
    _, _, hidden, seq_ids = out
    _, _, ref_hidden, _ = ref_out
    return response_token_kl(ref_head, ref_hidden, head, hidden.detach(), seq_ids, num_sequences,
                             chunk_size=policy_scorer.chunk_size, softcap=softcap)
