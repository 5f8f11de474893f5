"""The chunked response log-probs equal the textbook full-logits computation, values and gradients."""

from __future__ import annotations

import torch

from alphadpo_cli.config import ModelConfig
from alphadpo_cli.data import PairCollator, TokenizeSettings, tokenize_split
from alphadpo_cli.logprobs import SequenceLogps, reference_full_logps
from alphadpo_cli.modeling import build_tiny_model, build_tiny_tokenizer


def _batch(prefs_dir):
    tok = build_tiny_tokenizer()
    split = tokenize_split(str(prefs_dir), "train", tok, TokenizeSettings(256, 128), max_samples=3)
    return tok, PairCollator(tok.pad_token_id)([split.dataset[i] for i in range(3)])


def test_chunked_equals_full_logits(prefs_dir):
    tok, b = _batch(prefs_dir)
    model = build_tiny_model(ModelConfig(), len(tok)).double()
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    sums, counts = SequenceLogps(model, chunk_size=5)(*args)  # many small chunks
    sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_sums, ref_counts = reference_full_logps(model, *args)
    ref_sums.sum().backward()
    assert torch.allclose(sums.double(), ref_sums.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts.double(), ref_counts.double())
    assert counts.tolist() == (b["response_mask"][:, 1:].sum(1)).float().tolist()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_softcapping_is_applied(prefs_dir):
    tok, b = _batch(prefs_dir)
    model = build_tiny_model(ModelConfig(), len(tok))
    plain, _ = SequenceLogps(model)(b["input_ids"], b["attention_mask"], b["response_mask"])
    model.config.final_logit_softcapping = 0.5
    capped, _ = SequenceLogps(model)(b["input_ids"], b["attention_mask"], b["response_mask"])
    assert not torch.allclose(plain, capped)
    # With a cap of 0.5 every logit lies in (-0.5, 0.5): log-probs are near -log(V).
    per_token = capped / b["response_mask"][:, 1:].sum(1)
    assert torch.allclose(per_token, torch.full_like(per_token, -torch.log(torch.tensor(float(len(tok))))), atol=1.0)
