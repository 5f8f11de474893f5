"""Per-sequence log-probabilities of responses, from one concatenated forward.

The LM head is applied only to response positions, in chunks: no [batch, length, vocab] tensor
(and no float32 log-softmax of one) is ever built. Two ways to get the gradient:

* a frozen `nn.Linear` head (LoRA, QLoRA: the head is not trained) takes the fused path: each
  chunk's input gradient direction ``W[y] - softmax(hW^T) W`` is formed in the forward pass and
  kept ([N, hidden], small), so backward is a multiply: 4·V·H FLOPs per response token instead
  of 6·V·H, and no logits exist outside the forward of one chunk;
* any other head (trained, LoRA-wrapped, DeepSpeed ZeRO-3 partitioned, soft-capped) runs each
  chunk under activation checkpointing and is called as a module, so DDP and ZeRO-3 hooks see it;
  backward recomputes one chunk's logits at a time.

The chunk size defaults to about 2^25 logits (128 MB in float32) per chunk on a GPU, 2^23 on a CPU.

Two input layouts are accepted by `SequenceLogps.forward`:

* padded (`logps.layouts.PairCollator`): input_ids/attention_mask/response_mask [2B, T];
* packed (`logps.layouts.PackedPairCollator`): one padding-free row with position_ids, a segment plan and
  the flat positions/labels/sequence ids of the response tokens (see `alphadpo_cli.logps.layouts`).
  Its attention is `alphadpo_cli.kernels.segment_attention`. When a model's attention asks for something
  that kernel does not implement (found at its first packed forward, whose result is then discarded),
  that and every later packed batch of the model run through its own padded forward, one right-padded
  row per segment, with one notice: the same log-probs, without the packing's savings.

Token-level KL (TDPO's δ, the `alpha_dpo_token_kl` loss): `SequenceLogps.forward(..., return_hidden=True)`
also returns the response positions' hidden states (flat [N, H], detached) and their sequence ids;
`response_token_kl` turns a reference's and the policy's into Σ_t KL(πref(·|t) ‖ πθ(·|t)) per sequence,
chunk by chunk through the two LM heads, without gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.adapters import adapter_autocast, adapter_compute_dtype, unwrap_causal_lm
from ..kernels.segment_attention import (SEGMENT_KWARG, SegmentPlan, mark_packed_fallback, packed_fallback_reason,
                                         uses_segment_attention)
from ..models.checkpointing import RecomputeAsForward
from ..models.loading import notice
from .layouts import PACKED_KEYS

DEFAULT_CHUNK = None  # auto: see `auto_chunk_size`
CHUNK_LOGITS = 1 << 25
CPU_CHUNK_LOGITS = 1 << 23


def auto_chunk_size(vocab_size: int, logits_per_chunk: int = CHUNK_LOGITS) -> int:
    """Response tokens per LM-head chunk so that one chunk holds about `logits_per_chunk` logits."""
    return max(16, logits_per_chunk // max(1, int(vocab_size)))


def _token_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(y | h) through a frozen linear head, with d logp / d h = W[y] - softmax(hW^T + b) W
    computed in the forward pass (no logits kept for backward, none recomputed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
        probs = logits.sub_(lse.unsqueeze(-1)).exp_()  # in place: one [n, V] buffer
        direction = weight.index_select(0, labels) - probs.to(weight.dtype) @ weight
        ctx.save_for_backward(direction)
        return logp

    @staticmethod
    def backward(ctx, grad):
        (direction,) = ctx.saved_tensors
        return grad.unsqueeze(-1).to(direction.dtype) * direction, None, None, None


def _frozen_linear(head: nn.Module) -> bool:
    w = getattr(head, "weight", None)
    b = getattr(head, "bias", None)
    return (
        type(head) is nn.Linear
        and not w.requires_grad
        and (b is None or not b.requires_grad)
        and not hasattr(w, "ds_id")  # DeepSpeed ZeRO-3: the module call gathers the weight
        and w.numel() > 0
    )


def response_token_logps(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
    softcap: float | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """log p(label | hidden) for N selected positions ([N, H] -> [N]), chunk by chunk."""
    if not chunk_size:  # on CPU smaller chunks cost no speed and keep ~200 MB less in flight
        chunk_size = auto_chunk_size(getattr(head, "out_features", None) or head.weight.shape[0],
                                     CHUNK_LOGITS if hidden.is_cuda else CPU_CHUNK_LOGITS)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    use_fused = fused and grad and not softcap and _frozen_linear(head)
    # A LoRA-wrapped head is recomputed with PEFT's input casting as its forward had it. Only then: any
    # other head keeps torch's default context. (With a context_fn on every head chunk, two-process
    # ZeRO-3 CPU runs aborted at exit, "terminate called without an active exception"; the cause was
    # not pinned down, tests/test_deepspeed_cpu.py catches it.)
    recompute = {}
    if grad and not use_fused:
        ctx = RecomputeAsForward(head)
        if ctx.has_adapters:
            recompute = {"context_fn": ctx}
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start: start + chunk_size], labels[start: start + chunk_size]
        if use_fused:
            outs.append(_FrozenHeadLogps.apply(h, head.weight, head.bias, y))
        elif grad:
            outs.append(checkpoint(_token_logps, head, h, y, softcap, use_reentrant=False, **recompute))
        else:
            outs.append(_token_logps(head, h, y, softcap))
    if not outs:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(outs)


def _chunk_log_probs(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """log_softmax of one chunk's logits ([n, H] -> [n, V]), float32 (float64 for a float64 head)."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)  # accelerate hands bf16 outputs back as float32
    logits = head(hidden)
    if logits.dtype != torch.float64:
        logits = logits.float()  # a fresh tensor either way: the in-place steps below touch nothing else
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


@torch.no_grad()
def response_token_kl(
    ref_head: nn.Module,
    ref_hidden: torch.Tensor,
    policy_head: nn.Module,
    policy_hidden: torch.Tensor,
    seq_ids: torch.Tensor,
    num_sequences: int,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
    softcap: float | None = None,
) -> torch.Tensor:
    """Σ_t KL(πref(·|t) ‖ πθ(·|t)) over the response positions of each sequence -> [num_sequences].

    `ref_hidden`/`policy_hidden` are the [N, H] hidden states of the same N response positions (as
    `SequenceLogps.forward(..., return_hidden=True)` returns them), `seq_ids` [N] their sequence.
    Computed without gradient (the result is a constant for autograd), in float32, one chunk of
    [chunk, V] logits per head at a time; `softcap` is Gemma's final_logit_softcapping. The reference
    head of an adapter-disabled reference is `adapter_free(policy_head)`.
    """
    if ref_hidden.shape[0] != policy_hidden.shape[0] or seq_ids.shape[0] != policy_hidden.shape[0]:
        raise ValueError(f"token KL: {ref_hidden.shape[0]} reference, {policy_hidden.shape[0]} policy positions, "
                         f"{seq_ids.shape[0]} sequence ids")
    if not chunk_size:
        vocab = getattr(policy_head, "out_features", None) or policy_head.weight.shape[0]
        chunk_size = auto_chunk_size(vocab, CHUNK_LOGITS if policy_hidden.is_cuda else CPU_CHUNK_LOGITS)
    out = None
    for start in range(0, policy_hidden.shape[0], chunk_size):
        stop = start + chunk_size
        ref_logp = _chunk_log_probs(ref_head, ref_hidden[start:stop], softcap)
        pol_logp = _chunk_log_probs(policy_head, policy_hidden[start:stop], softcap)
        diff = pol_logp.neg_().add_(ref_logp)  # log πref − log πθ, in pol_logp's buffer
        kl = diff.mul_(ref_logp.exp_()).sum(-1)
        if out is None:
            out = torch.zeros(int(num_sequences), dtype=kl.dtype, device=kl.device)
        out.index_add_(0, seq_ids[start:stop].to(kl.device), kl)
    if out is None:
        out = torch.zeros(int(num_sequences), dtype=torch.float32, device=policy_hidden.device)
    return out


class SequenceLogps(nn.Module):
    """Wraps a causal LM so that its forward returns per-sequence response log-prob sums and counts.

    Being one module, it can be handed to accelerate/DeepSpeed and called through their wrappers.
    Float32 adapters on a bf16/fp16 base run under autocast (`adapter_autocast`).
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self._adapter_dtype: torch.dtype | None | bool = False  # False: not looked at yet

    def forward(
        self,
        input_ids,
        attention_mask=None,
        response_mask=None,
        position_ids=None,
        *,
        segments=None,
        target_index=None,
        target_labels=None,
        target_seq=None,
        num_sequences=None,
        return_hidden=False,
    ):
        """(sums, counts) per sequence: chosen rows 0..B-1 then rejected rows B..2B-1.

        return_hidden=True: (sums, counts, hidden, seq_ids), hidden the [N, H] final hidden states
        (detached) of the N response positions the head scored and seq_ids [N] the sequence each
        belongs to (padded: sequence by sequence; packed: in row order), for `response_token_kl`.
        """
        if self._adapter_dtype is False:
            self._adapter_dtype = adapter_compute_dtype(self.model)
        with adapter_autocast(self.model, input_ids.device, self._adapter_dtype):
            return self._forward(input_ids, attention_mask, response_mask, position_ids, segments, target_index,
                                 target_labels, target_seq, num_sequences, return_hidden)

    def output_head(self) -> tuple[nn.Module, float | None]:
        """The LM head and the final-logit soft cap (None without one) of the wrapped model."""
        lm = unwrap_causal_lm(self.model)
        return lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)

    def _forward(self, input_ids, attention_mask, response_mask, position_ids, segments, target_index,
                 target_labels, target_seq, num_sequences, return_hidden=False):
        lm = unwrap_causal_lm(self.model)
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if segments is not None:
            return self._packed(decoder, head, softcap, input_ids, position_ids, segments, target_index,
                                target_labels, target_seq, int(num_sequences), return_hidden)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = decoder(**kwargs).last_hidden_state
        target = response_mask[:, 1:]
        seq_ids = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target)[target]
        flat = hidden[:, :-1][target]
        tok = response_token_logps(head, flat, input_ids[:, 1:][target], chunk_size=self.chunk_size, softcap=softcap)
        sums = torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=input_ids.device)
        sums = sums.index_add(0, seq_ids, tok)
        counts = target.sum(dim=1).to(tok.dtype)
        if return_hidden:
            return sums, counts, flat.detach(), seq_ids
        return sums, counts

    def _packed(self, decoder, head, softcap, input_ids, position_ids, segments, target_index, target_labels,
                target_seq, num_sequences, return_hidden=False):
        if not uses_segment_attention(decoder):
            raise RuntimeError("packed batches need packing.install_segment_attention(model) first")
        flat = None
        if packed_fallback_reason(decoder) is None:
            plan = SegmentPlan(segments, input_ids.device, position_ids)
            # A dummy 4D mask makes transformers skip building a [T, T] mask the segment kernel never reads.
            dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
            hidden = decoder(
                input_ids=input_ids, position_ids=position_ids, attention_mask=dummy_mask, use_cache=False,
                **{SEGMENT_KWARG: plan},
            ).last_hidden_state
            problem = plan.problem()
            if problem is None:
                flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
            else:  # decided at the first packed forward; its result is discarded
                del hidden
                mark_packed_fallback(decoder, problem)
                notice(f"packed batches of {type(decoder).__name__} run through its own padded forward instead: "
                       f"{problem}.")
        if flat is None:
            flat = self._packed_as_padded(decoder, input_ids, position_ids, segments, target_index)
        tok = response_token_logps(head, flat, target_labels, chunk_size=self.chunk_size, softcap=softcap)
        sums = torch.zeros(num_sequences, dtype=tok.dtype, device=input_ids.device).index_add(0, target_seq, tok)
        counts = torch.bincount(target_seq, minlength=num_sequences).to(tok.dtype)
        if return_hidden:
            return sums, counts, flat.detach(), target_seq
        return sums, counts

    @staticmethod
    def _packed_as_padded(decoder, input_ids, position_ids, segments, target_index):
        """The hidden states at `target_index` of a packed row, from the model's own padded forward: one
        right-padded row per segment (its prefix, then its own tokens, with their position ids)."""
        ids, pos = input_ids.reshape(-1), position_ids.reshape(-1)
        segs = segments.tolist() if isinstance(segments, torch.Tensor) else [list(x) for x in segments]
        width = max((qe - qs) + (pe - ps) for qs, qe, ps, pe in segs)
        dev = ids.device
        rows_ids = torch.zeros(len(segs), width, dtype=ids.dtype, device=dev)
        rows_pos = torch.zeros(len(segs), width, dtype=pos.dtype, device=dev)
        rows_mask = torch.zeros(len(segs), width, dtype=torch.long, device=dev)
        row_of = torch.empty(ids.shape[0], dtype=torch.long)
        col_of = torch.empty(ids.shape[0], dtype=torch.long)
        for j, (qs, qe, ps, pe) in enumerate(segs):
            idx = torch.cat([torch.arange(ps, pe), torch.arange(qs, qe)]).to(dev)
            n = idx.shape[0]
            rows_ids[j, :n], rows_pos[j, :n], rows_mask[j, :n] = ids[idx], pos[idx], 1
            row_of[qs:qe] = j
            col_of[qs:qe] = torch.arange(pe - ps, pe - ps + qe - qs)
        hidden = decoder(input_ids=rows_ids, attention_mask=rows_mask, position_ids=rows_pos,
                         use_cache=False).last_hidden_state
        t = target_index.cpu()
        return hidden[row_of[t].to(dev), col_of[t].to(dev)]


def scorer_inputs(batch: dict) -> dict:
    """The keyword arguments of `SequenceLogps.forward` found in a collated batch (padded or packed)."""
    if "segments" in batch:
        return {"input_ids": batch["input_ids"], **{k: batch[k] for k in PACKED_KEYS}}
    return {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "position_ids") if k in batch}


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens fed to the model for a collated batch."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    return int(batch["attention_mask"].sum())


def reference_full_logps(model: nn.Module, input_ids, attention_mask, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook computation (full logits, log_softmax, gather), used as an oracle in tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:].to(logp.dtype)
    return (logp * mask).sum(1), mask.sum(1)
