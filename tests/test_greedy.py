"""Greedy decoding that drops finished answers (`alphadpo_cli.evaluation.greedy`) answers what
transformers' `generate` answers, for each architecture the presets name.

The oracle is `model.generate(do_sample=False)` on the same left-padded batch. The stop id is chosen
from the model's own continuations so that some answers stop after a few tokens and others run to
`max_new_tokens`: the batch must really shrink (counted at the model's forward), and what is left
must still decode as `generate` decodes it. Gemma-2 with its sliding window shorter than the
answers and both soft-caps binding, Mistral with a sliding window.
"""

from __future__ import annotations

import pytest
import torch

from alphadpo_cli.evaluation.greedy import greedy_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
WINDOW = 6
NEW = 14


def _tiny(arch: str):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, head_dim=8, sliding_window=WINDOW))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                               attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
                                               attn_implementation="eager"))
    with torch.no_grad():  # weighty weights: answers that differ from prompt to prompt
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model.float().eval()  # (float64 Gemma-2 with left padding is NaN in transformers: its mask overflows)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7, 4, 10, 6)]


def _generate(model, prompts, stops, max_new=NEW) -> list[list[int]]:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=stops or None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        answers.append(row if cut is None else row[:cut + 1])
    return answers


def _stop_that_splits(free: list[list[int]]) -> int:
    """A token that ends some answers early (within 6 tokens) and appears in other answers not at all."""
    for cand in sorted({t for a in free for t in a[:6]}):
        early = sum(cand in a[:6] for a in free)
        never = sum(cand not in a for a in free)
        if early >= 2 and never >= 2:
            return cand
    raise AssertionError(f"no splitting stop id in {free}")


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_greedy_decode_answers_what_generate_answers(arch):
    model = _tiny(arch)
    prompts = _prompts()
    free = _generate(model, prompts, [])
    assert len({tuple(a) for a in free}) >= 4, "the tiny model answers every prompt alike: nothing is tested"
    stop = _stop_that_splits(free)
    want = _generate(model, prompts, [stop])
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        got = greedy_decode(model, prompts, max_new_tokens=NEW, stop_ids=[stop], pad_id=0)
    finally:
        hook.remove()
    assert got == want
    lengths = sorted(len(a) for a in got)
    assert lengths[0] < NEW // 2 and lengths[-1] == NEW  # some stopped early, some ran to the end
    assert widths[0] == len(prompts) and widths[-1] < len(prompts) and widths == sorted(widths, reverse=True)
    assert len(widths) == NEW  # the prefill and one forward per later token


def test_greedy_decode_edges():
    model = _tiny("llama")
    prompts = _prompts()[:3]
    assert greedy_decode(model, [], max_new_tokens=5, stop_ids=[1], pad_id=0) == []
    assert greedy_decode(model, prompts, max_new_tokens=0, stop_ids=[1], pad_id=0) == [[], [], []]
    one = greedy_decode(model, prompts, max_new_tokens=1, stop_ids=[], pad_id=0)
    assert one == _generate(model, prompts, [], max_new=1) and all(len(a) == 1 for a in one)
    # every answer stops at its first token: one forward, no decoding step
    first = {a[0] for a in one}
    assert greedy_decode(model, prompts, max_new_tokens=9, stop_ids=sorted(first), pad_id=0) == one


def test_a_model_file_that_changes_greedy_search_keeps_generate():
    """transformers fills what we leave unset from the model's generation_config.json: a repetition
    penalty or beams there make `generate(do_sample=False)` something else than argmax decoding, so
    such a model is decoded by `generate` as before, and the plain loop is used only where it is
    `generate`'s answer."""
    from alphadpo_cli.evaluation.greedy import plain_greedy

    model = _tiny("llama")
    assert plain_greedy(model)
    prompts = _prompts()
    model.generation_config.repetition_penalty = 1.3
    assert not plain_greedy(model)
    penalised = _generate(model, prompts, [])
    plain = greedy_decode(model, prompts, max_new_tokens=NEW, stop_ids=[], pad_id=0)
    assert penalised != plain  # the penalty matters here: the loop would have answered otherwise
    model.generation_config.repetition_penalty = 1.0
    model.generation_config.num_beams = 2
    assert not plain_greedy(model)
