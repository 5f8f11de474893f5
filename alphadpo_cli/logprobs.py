"""Per-sequence log-probabilities of responses, from one concatenated forward.

The LM head is applied only to response positions, in chunks, each under activation
checkpointing: no [batch, length, vocab] tensor (and no float32 log-softmax of one) is ever
built, and backward recomputes one chunk's logits at a time. The head is called as a module, so
DDP and DeepSpeed ZeRO-3 hooks see it.

Two input layouts are accepted by `SequenceLogps.forward`:

* padded (`data.PairCollator`): input_ids/attention_mask/response_mask [2B, T];
* packed (`packing.PackedPairCollator`): one padding-free row with position_ids, a segment plan and
  the flat positions/labels/sequence ids of the response tokens (see `alphadpo_cli.packing`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 2048


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _token_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_token_logps(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(label | hidden) for N selected positions ([N, H] -> [N]), chunk by chunk."""
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start: start + chunk_size], labels[start: start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_token_logps, head, h, y, softcap, use_reentrant=False))
        else:
            outs.append(_token_logps(head, h, y, softcap))
    if not outs:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(outs)


class SequenceLogps(nn.Module):
    """Wraps a causal LM so that its forward returns per-sequence response log-prob sums and counts.

    Being one module, it can be handed to accelerate/DeepSpeed and called through their wrappers.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

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
    ):
        """(sums, counts) per sequence: chosen rows 0..B-1 then rejected rows B..2B-1."""
        lm = unwrap_causal_lm(self.model)
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if segments is not None:
            return self._packed(decoder, head, softcap, input_ids, position_ids, segments, target_index,
                                target_labels, target_seq, int(num_sequences))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = decoder(**kwargs).last_hidden_state
        target = response_mask[:, 1:]
        seq_ids = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target)[target]
        tok = response_token_logps(
            head, hidden[:, :-1][target], input_ids[:, 1:][target], chunk_size=self.chunk_size, softcap=softcap
        )
        sums = torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=input_ids.device)
        sums = sums.index_add(0, seq_ids, tok)
        counts = target.sum(dim=1).to(tok.dtype)
        return sums, counts

    def _packed(self, decoder, head, softcap, input_ids, position_ids, segments, target_index, target_labels,
                target_seq, num_sequences):
        from .packing import SEGMENT_KWARG, SegmentPlan, uses_segment_attention

        if not uses_segment_attention(decoder):
            raise RuntimeError("packed batches need packing.install_segment_attention(model) first")
        plan = SegmentPlan(segments, input_ids.device)
        # A dummy 4D mask makes transformers skip building a [T, T] mask the segment kernel never reads.
        dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
        hidden = decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=dummy_mask, use_cache=False,
            **{SEGMENT_KWARG: plan},
        ).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        tok = response_token_logps(head, flat, target_labels, chunk_size=self.chunk_size, softcap=softcap)
        sums = torch.zeros(num_sequences, dtype=tok.dtype, device=input_ids.device).index_add(0, target_seq, tok)
        counts = torch.bincount(target_seq, minlength=num_sequences).to(tok.dtype)
        return sums, counts


def scorer_inputs(batch: dict) -> dict:
    """The keyword arguments of `SequenceLogps.forward` found in a collated batch (padded or packed)."""
    if "segments" in batch:
        from .packing import PACKED_KEYS

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
