"""One optimiser step: the micro-batches' forward and backward (scaled so that the step is the mean
over its pairs however it is cut: `loss_scale`), clipping, the non-finite check and the
optimiser/scheduler update (`step`; under DeepSpeed the engine's backward and step driven here, so
that a non-finite step never reaches the weights: `withheld_updates`), over a stream of
micro-batches that runs epoch after epoch (`epoch_batches`).

A micro-batch becomes per-sequence log-probs of the policy (`forward`), with the reference's next to
them: taken from the precomputed scores, or run online (a separate frozen model, or the policy with
its adapters disabled), and for TDPO's δ the token-level KL(πref‖πθ) from both forwards' hidden
states. The loss itself is the registry's (`Objective`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..logps.sequence import batch_tokens, response_token_kl, scorer_inputs
from ..losses import LossOutput, MarginNormalizer, PreferenceLogps, compute_loss
from ..models.adapters import adapter_free, reference_mode
from ..models.loading import LoadedModels
from .checkpoint import TrainerState
from .distributed import is_deepspeed
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
         reference: PreferenceLogps | None, max_grad_norm: float | None,
         pair_tokens: torch.Tensor | None = None) -> StepOutput:
    """One optimiser step over the next micro-batches of `batches`: as many as the run accumulates
    (fewer at an epoch's end). `reference`: the precomputed reference scores of the training split
    (None: run online, or a reference-free method). `pair_tokens`: each split row's tokens, what
    `StepOutput.tokens` counts (None: the tokens fed). Counts the step in `state`.

    The update is the gradient of the mean loss over the step's pairs (all micro-batches, all
    processes), however the step was cut: `loss_scale`. It is applied only when every pair's loss
    and the gradient are finite on every process; otherwise no weight, no optimiser state moves
    (`StepOutput.finite` False, counted in `state.skipped_nonfinite`). Under DeepSpeed the step
    drives the engine itself (`engine.backward`, the accumulation boundary, `engine.step`) so that
    it decides before the engine updates anything: see `_deepspeed_update`."""
    acc = parts.accelerator
    engine = parts.scorer if is_deepspeed(acc) else None
    todo = _step_batches(parts, batches, state)
    pairs, tokens = _global_counts(acc, todo, pair_tokens)
    scale = loss_scale(acc, engine, pairs)
    micro = []
    if objective.normalizer is not None:  # the step's micro-batches share μ, σ; its pooled g update them at the end
        objective.normalizer.begin_step()
    with GradientWatch(parts.trainable if engine is not None else []) as watch:
        for i, batch in enumerate(todo):
            with _accumulating(acc, engine, parts.scorer, last=i == len(todo) - 1):
                inputs = forward(parts, objective, batch, reference)
                out = objective(inputs)
                loss = out.losses.sum() * scale
                if engine is not None:
                    engine.backward(loss)  # divides by its accumulation count; steps nothing
                else:
                    acc.backward(loss)  # divides by the accumulation count
            micro.append(gather_micro(acc, out, inputs))
    losses_finite = all(bool(torch.isfinite(m["losses"]).all()) for m in micro)  # every pair of every process
    if engine is not None:
        applied, grad_norm = _deepspeed_update(acc, engine, losses_finite and watch.finite(acc))
    else:
        # The norm is needed for the non-finite check even without clipping.
        clip = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(parts.trainable, clip)
        applied = losses_finite and (grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm))))
        if applied:
            parts.optimizer.step()
            applied = not parts.optimizer.step_was_skipped  # (fp16's loss scaler skips overflowing steps)
    if applied:
        state.nonfinite_in_row = 0
    else:
        state.skipped_nonfinite += 1
        state.nonfinite_in_row += 1
    if objective.normalizer is not None:  # a skipped step leaves the statistics as it leaves the weights
        objective.normalizer.end_step(update=applied)
    lr_used = parts.scheduler.get_last_lr()[0]
    with contextlib.nullcontext() if applied else _scheduler_order_warning_off():
        parts.scheduler.step()  # a skipped step uses up its learning rate too
    parts.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    metrics = step_metrics(micro, grad_norm, lr_used, objective.normalizer)
    metrics["nonfinite_skipped"] = state.skipped_nonfinite
    return StepOutput(metrics, applied, pairs, tokens, last_rows=todo[-1]["index"])


@contextlib.contextmanager
def _scheduler_order_warning_off():
    """torch's warning that `lr_scheduler.step()` ran before any `optimizer.step()` (the scheduler's
    first step, if the optimiser's step has never run) ignored: a skipped first step advances the
    schedule without an optimiser step on purpose. Only around a skipped step's scheduler step; an
    applied step keeps torch's check."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                r"`optimizer\.step\(\)`", category=UserWarning)
        yield


def _step_batches(parts: TrainParts, batches: Iterator[dict], state: TrainerState) -> list[dict]:
    """The step's micro-batches, all taken before the first forward (their pair counts set the loss
    scale): the accumulation count, or what is left of the epoch when fewer (the step that ends an
    epoch is short; the next step starts the next epoch). The same count on every process: the
    prepared loader gives each the same number of batches."""
    per_epoch = len(parts.loader)
    left = per_epoch - state.batches_in_epoch
    n = min(parts.accelerator.gradient_accumulation_steps, left if left > 0 else per_epoch)
    return [next(batches) for _ in range(n)]


def _global_counts(acc, todo: list[dict], pair_tokens: torch.Tensor | None = None) -> tuple[int, int]:
    """(pairs, tokens) of the step's micro-batches summed over all processes: the pairs' own tokens
    (`pair_tokens` by row), else the tokens fed to the model."""
    if pair_tokens is not None:
        tokens = sum(int(pair_tokens[b["index"].cpu()].sum()) for b in todo)
    else:
        tokens = sum(batch_tokens(b) for b in todo)
    local = torch.tensor([sum(int(b["index"].shape[0]) for b in todo), tokens], dtype=torch.long, device=acc.device)
    if acc.num_processes > 1:
        local = acc.reduce(local, reduction="sum")
    return int(local[0]), int(local[1])


def loss_scale(acc, engine, pairs: int) -> float:
    """What each pair's loss is multiplied by before the backward, so that the accumulated gradient
    is that of the mean over the step's `pairs` (all processes), whatever the split into processes,
    micro-batches and accumulation steps, a short last micro-batch or step included: the backward
    divides the loss by the accumulation count (accelerate's `backward` outside DeepSpeed; the
    DeepSpeed engine's `backward` by its own), and the gradient is averaged over the processes (DDP
    and ZeRO alike). So Σ(pair losses) × accumulation × processes / pairs makes the update
    (1/pairs) Σ ∇loss_i."""
    divisor = engine.gradient_accumulation_steps() if engine is not None else acc.gradient_accumulation_steps
    return divisor * acc.num_processes / max(pairs, 1)


@contextlib.contextmanager
def _accumulating(acc, engine, model, *, last: bool):
    """One micro-batch of a step: gradients are synchronised on the step's last micro-batch only.
    Under DeepSpeed the engine is told whether this is its accumulation boundary; otherwise DDP's
    synchronisation is off for the others (accelerate's `no_sync`, a no-op in one process).
    `accelerator.sync_gradients` says the same, for accelerate's optimiser wrapper."""
    acc.sync_gradients = last
    if engine is not None:
        engine.set_gradient_accumulation_boundary(last)
        yield
    elif last:
        yield
    else:
        with acc.no_sync(model):
            yield


def _deepspeed_update(acc, engine, finite: bool) -> tuple[bool, Any]:
    """The DeepSpeed engine's step at the accumulation boundary: (applied, gradient norm).

    `engine.step()` always runs: it is what ends DeepSpeed's accumulation (reduces, clips, clears
    its gradient buffers and counters), and DeepSpeed has no public call that drops a step's
    gradients without it. When `finite` is False (decided here on every process alike), it runs
    with every optimiser update withheld (`withheld_updates`): the optimiser sees no gradient, so
    weights, fp32 master weights and moments stay bit for bit what they were. DeepSpeed may also
    skip a step by itself (its fp16 loss scaler; version 0.19.8 also skips an inf/NaN gradient
    norm in ZeRO-2/3 bf16 and fp32); `engine.was_step_applied()` reports that, so the step counts
    as skipped either way."""
    with contextlib.nullcontext() if finite else withheld_updates():
        engine.step()
    applied = finite and bool(engine.was_step_applied())
    return applied, engine.get_global_grad_norm()


@contextlib.contextmanager
def withheld_updates():
    """While open, no torch optimiser updates anything: for each `optimizer.step()` call, every
    parameter's gradient is set aside (torch's global step pre-hook) and put back after it (the
    post-hook). torch's optimisers, and DeepSpeed's CPU Adam, skip a parameter without a gradient
    entirely: no update, no weight decay, no moment or step-count change."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    aside: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_aside(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    aside.append((p, p.grad))
                    p.grad = None

    def put_back(optimizer, args, kwargs):
        for p, g in aside:
            p.grad = g
        aside.clear()

    handles = [register_optimizer_step_pre_hook(set_aside), register_optimizer_step_post_hook(put_back)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        put_back(None, None, None)


class GradientWatch:
    """Whether every gradient the backward passes of a step computed was finite, on every process.

    A hook on each watched parameter sees its gradient as autograd hands it over, before DeepSpeed
    reduces and partitions it (under ZeRO the full gradient exists only then), and keeps the
    running maximum of |g| (one fused reduction per gradient, no copy, no device sync). `finite`
    gathers it from every process once per step. The reduced gradient is a mean of these, finite
    when they all are (barring an overflow of the sum itself, which DeepSpeed's own check and
    `was_step_applied` cover)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.worst: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self) -> "GradientWatch":
        self.handles = [p.register_hook(self._see) for p in self.params]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _see(self, grad: torch.Tensor) -> None:
        m = torch.linalg.vector_norm(grad.detach(), ord=float("inf")).float()  # NaN stays NaN
        self.worst = m if self.worst is None else torch.maximum(self.worst, m.to(self.worst.device))

    def finite(self, acc) -> bool:
        """All processes' watched gradients finite (every process gets the same answer)."""
        worst = torch.zeros(1, device=acc.device) if self.worst is None else self.worst.reshape(1).to(acc.device)
        if acc.num_processes > 1:
            worst = acc.gather(worst)
        return bool(torch.isfinite(worst).all())


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
