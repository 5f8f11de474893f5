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


def test_fused_frozen_head_equals_full_logits(prefs_dir):
    """LoRA-like: the head (tied embedding) is frozen, so the fused forward-gradient path is taken."""
    from alphadpo_cli import logprobs

    tok, b = _batch(prefs_dir)
    model = build_tiny_model(ModelConfig(), len(tok)).double()
    model.get_input_embeddings().weight.requires_grad_(False)  # tied: the head is frozen too
    assert logprobs._frozen_linear(model.get_output_embeddings())
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    sums, _ = SequenceLogps(model, chunk_size=5)(*args)
    sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_sums, _ = reference_full_logps(model, *args)
    ref_sums.sum().backward()
    # the oracle takes its log-softmax in float32
    assert torch.allclose(sums, ref_sums.double(), rtol=1e-6, atol=1e-6)
    assert grads
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (grads[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-8, n


def test_fused_and_checkpointed_heads_agree_fp32():
    from torch import nn

    from alphadpo_cli.logprobs import auto_chunk_size, response_token_logps

    torch.manual_seed(0)
    head = nn.Linear(32, 300, bias=True)
    head.requires_grad_(False)
    h = torch.randn(50, 32, requires_grad=True)
    y = torch.randint(0, 300, (50,))
    g = torch.randn(50)
    a = response_token_logps(head, h, y, chunk_size=16)
    (ga,) = torch.autograd.grad(a, h, g)
    b = response_token_logps(head, h, y, chunk_size=16, fused=False)
    (gb,) = torch.autograd.grad(b, h, g)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-5)
    assert auto_chunk_size(49152) == 682 and auto_chunk_size(128256) == 261 and auto_chunk_size(10**9) == 16


def test_checkpoint_some_layers(prefs_dir):
    from alphadpo_cli.logprobs import checkpoint_layers
    from alphadpo_cli.packing import tune_cpu_allocator

    tok, b = _batch(prefs_dir)
    model = build_tiny_model(ModelConfig(tiny_layers=3), len(tok)).double()
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    grads = []
    for n in (0, 2, 3):
        assert checkpoint_layers(model, n) == n
        assert [layer.gradient_checkpointing for layer in model.model.layers] == [i < n for i in range(3)]
        model.zero_grad()
        SequenceLogps(model)(*args)[0].sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert checkpoint_layers(model, -1) == 3  # left as it is
    for g in grads[1:]:
        for k in g:
            assert torch.allclose(g[k], grads[0][k], rtol=1e-10, atol=1e-12), k
    import sys

    assert tune_cpu_allocator() == sys.platform.startswith("linux")
