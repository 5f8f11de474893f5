"""One BOS rule (`data.uses_document_bos`) for training (`PairTokenizer`) and generation
(`evaluation.generate.ChatGenerator`, `render_prompt`): a generated prompt starts as the training
prompt does, on tokenizers built offline from the tiny byte-level one and chat-template strings."""

from __future__ import annotations

import pytest
from tokenizers import processors

from alphadpo_cli.data import PairTokenizer, TokenizeSettings, to_pair, uses_document_bos
from alphadpo_cli.evaluation.generate import ChatGenerator, Decoding, render_prompt
from alphadpo_cli.models.loading import build_tiny_tokenizer
from alphadpo_cli.models.templates import GEMMA_TEMPLATE, MISTRAL_TEMPLATE

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _adds_bos(tok):
    """Make the tokenizer put its BOS in front of every encoding, as Llama-3's, Gemma's and Mistral's do."""
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("x").input_ids[0] == tok.bos_token_id
    return tok


def _tokenizer(kind: str):
    tok = build_tiny_tokenizer()  # ChatML, BOS <|endoftext|> that neither the template nor the tokenizer adds
    if kind == "no BOS token":
        tok.bos_token = None
    elif kind == "SmolLM2: <|im_start|> named BOS":
        tok.bos_token = "<|im_start|>"
    elif kind.startswith("Llama-3"):
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
        tok.chat_template = LLAMA3_TEMPLATE
        if "adds" in kind:
            _adds_bos(tok)
    elif kind == "Gemma: <bos> written and added":
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<end_of_turn>",
                                "additional_special_tokens": ["<start_of_turn>"]})
        tok.chat_template = GEMMA_TEMPLATE
        _adds_bos(tok)
    elif kind == "Mistral: <s> added, not written":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
        tok.chat_template = MISTRAL_TEMPLATE
        _adds_bos(tok)
    elif kind == "a template that doubles the BOS":
        tok.chat_template = "{{ bos_token }}{{ bos_token }}" + tok.chat_template
    else:
        assert kind == "tiny"
    return tok


CASES = [  # (tokenizer, does it use a document BOS)
    ("tiny", False),
    ("no BOS token", False),
    ("SmolLM2: <|im_start|> named BOS", False),
    ("Llama-3: <|begin_of_text|> written by the template", True),
    ("Llama-3: written by the template and added by the tokenizer", True),
    ("Gemma: <bos> written and added", True),
    ("Mistral: <s> added, not written", True),
    ("a template that doubles the BOS", True),
]


def _generator(tok, monkeypatch) -> ChatGenerator:
    """The evaluation's generator with this tokenizer (no model: only prompts are built)."""
    import alphadpo_cli.models.loading as loading

    monkeypatch.setattr(loading, "load_for_inference", lambda *a, **k: (None, tok))
    return ChatGenerator("offline-test-model", decoding=Decoding(), backend="transformers")


@pytest.mark.parametrize("kind, document_bos", CASES, ids=[c[0] for c in CASES])
def test_training_and_generation_start_prompts_alike(kind, document_bos, monkeypatch):
    tok = _tokenizer(kind)
    bos = tok.bos_token_id
    training = PairTokenizer(tok, TokenizeSettings(max_length=256, max_prompt_length=128))
    assert uses_document_bos(tok) is document_bos
    assert training.uses_bos is document_bos

    pair = to_pair({"prompt": "Hi there", "chosen": "Yes", "rejected": "No"}, "x")
    prompt = training(pair)["prompt_ids"]
    generated = _generator(tok, monkeypatch).prompt_ids(pair.prompt)
    # the generation prompt is the training prompt followed by the assistant header (if any)
    assert generated[:len(prompt)] == prompt
    if document_bos:  # exactly one, first
        assert prompt[0] == bos and bos not in prompt[1:] and bos not in generated[1:]
    elif bos is not None:  # left where the template puts it, never added
        text = tok.apply_chat_template(pair.prompt, tokenize=False)
        assert prompt.count(bos) == text.count(tok.bos_token)


@pytest.mark.parametrize("kind, document_bos", CASES, ids=[c[0] for c in CASES])
def test_truncated_prompts_keep_a_bos_in_front_only_if_it_is_a_document_bos(kind, document_bos):
    # training keeps a long prompt's end (data.truncation=keep_end), and so does the evaluation's
    # sampled KL (render_prompt with max_prompt_tokens): a document BOS is put back in front, a
    # per-turn marker is not
    tok = _tokenizer(kind)
    bos = tok.bos_token_id
    settings = TokenizeSettings(max_length=64, max_prompt_length=32)
    pair = to_pair({"prompt": "a long question " * 20, "chosen": "Yes " * 20, "rejected": "No " * 20}, "x")
    out = PairTokenizer(tok, settings)(pair)
    assert out["prompt_truncated"] and len(out["prompt_ids"]) == 32
    generated = render_prompt(tok, pair.prompt, bos=uses_document_bos(tok), max_prompt_tokens=32)
    assert len(generated) == 32
    assert (out["prompt_ids"][0] == bos) is document_bos
    assert (generated[0] == bos) is document_bos
