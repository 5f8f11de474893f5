"""Greedy decoding of a batch that drops its finished answers as it goes.

`transformers`' `generate` keeps every row of a batch until the last answer ends: a finished row
goes on being computed, fed padding, its KV cache grown and copied, every step. Answers of very
different lengths (the demo's base model: 7 to 128 tokens, 71 prompts) then cost the longest
answer's steps times the full batch: 45% of the row-steps are useful there. Here a row leaves the
batch, and its cache (`Cache.batch_select_indices`, transformers' public method), in the step
where it stops; what remains is decoded exactly as `generate` decodes it:

* the prompt batch left-padded, its attention mask and position ids as `generate` builds them
  (``cumsum(mask) - 1``, padding at 1), one forward over it filling a `DynamicCache`;
* then one token per step: the argmax of the last position's logits, fed back with the mask grown
  by one and the next position id, until a stop id (kept, as `generate` keeps EOS) or
  ``max_new_tokens``.

Only the batch's width changes, so the answers are `generate`'s greedy answers up to the rounding
of a smaller matrix product (tests/test_greedy.py: identical on tiny Llama, Mistral and Gemma-2
against `generate`; the demo's 142 answers identical in float32). transformers' own continuous
batching (`generate_batch`, paged attention) took 96 s where `generate` took 48 s for the demo's
base answers on 2 CPU cores; vLLM, used on a GPU, does this natively.
"""

from __future__ import annotations

from typing import Sequence

import torch


#: `GenerationConfig` fields by which a model's own generation_config.json changes what `generate` does
#: with the decoding we pass (transformers fills every field we leave unset from the model's file).
SEARCH_FIELDS = ("num_beams", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                 "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                 "forced_eos_token_id", "min_length", "min_new_tokens", "sequence_bias", "renormalize_logits",
                 "exponential_decay_length_penalty", "epsilon_cutoff", "eta_cutoff", "penalty_alpha",
                 "length_penalty", "diversity_penalty", "num_beam_groups", "constraints", "force_words_ids")


def plain_greedy(model) -> bool:
    """Whether `generate(do_sample=False)` is plain argmax decoding for this model: its own
    generation_config sets none of `SEARCH_FIELDS` away from transformers' default (a model file
    with, say, ``repetition_penalty`` is decoded by `generate`, as before)."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    if own is None:
        return True
    default = GenerationConfig()
    return all(getattr(own, f, None) in (None, getattr(default, f, None)) for f in SEARCH_FIELDS)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [N, longest] of token-id prompts, padded on the left, as a decoder-only
    model's batched generation expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy_decode(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int],
                  pad_id: int) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, a final stop id included), in order."""
    from transformers import DynamicCache

    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_padded(prompts, pad_id))
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return answers
    cache = DynamicCache(config=model.config)
    rows = torch.arange(len(prompts), device=device)  # which prompt each live row answers
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    last = positions[:, -1]
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        for row, t in zip(rows.tolist(), token.tolist()):
            answers[row].append(t)
        if step == max_new_tokens - 1:
            break
        live = ~torch.isin(token, stops)
        if not bool(live.any()):
            break
        if not bool(live.all()):  # the finished rows leave the batch and the cache
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, mask, last = rows[keep], token[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
    return answers
