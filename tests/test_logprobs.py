"""The chunked response log-probs equal the textbook full-logits computation, values and gradients."""

from __future__ import annotations

import torch

from alphadpo_cli.config import ModelConfig
from alphadpo_cli.logps.layouts import PairCollator
from alphadpo_cli.data import TokenizeSettings, tokenize_split
from alphadpo_cli.logps.sequence import SequenceLogps, reference_full_logps
from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer


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
    from alphadpo_cli.logps import sequence as logprobs

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

    from alphadpo_cli.logps.sequence import auto_chunk_size, response_token_logps

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
    from alphadpo_cli.models.checkpointing import checkpoint_layers
    from alphadpo_cli.kernels.cpu import tune_cpu_allocator

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


def _bf16_lora_policy():
    from alphadpo_cli.config import LoraConfig
    from alphadpo_cli.models.loading import load_models

    policy = load_models(ModelConfig(dtype="bf16"), LoraConfig(r=4, alpha=8, dropout=0.0),
                         need_reference_model=False).policy
    torch.manual_seed(0)
    for n, p in policy.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to get wrong
            torch.nn.init.normal_(p, std=0.05)
    return policy


def test_float32_adapters_on_bf16_weights_run_under_autocast(prefs_dir):
    """PEFT keeps LoRA weights in float32 on a bf16 base; the scorer runs them in bf16 under autocast
    (no float32 copies of activations) and still gives float32 gradients close to a float32 model's."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    from alphadpo_cli.models.adapters import adapter_compute_dtype

    _, b = _batch(prefs_dir)
    policy = _bf16_lora_policy()
    assert policy.get_input_embeddings().weight.dtype == torch.bfloat16
    assert adapter_compute_dtype(policy) == torch.bfloat16
    exact = copy.deepcopy(policy).float()
    assert adapter_compute_dtype(exact) is None  # all float32: nothing to autocast

    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    sums, _ = SequenceLogps(policy)(*args)
    assert sums.dtype == torch.float32
    sums.sum().backward()
    want, _ = SequenceLogps(exact)(*args)
    want.sum().backward()
    assert torch.allclose(sums, want, rtol=2e-2, atol=0.5), (sums, want)
    lora = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    ref_grads = dict(exact.named_parameters())
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in lora)
    g = torch.cat([p.grad.flatten() for _, p in lora])
    g_exact = torch.cat([ref_grads[n].grad.flatten() for n, _ in lora])
    assert torch.nn.functional.cosine_similarity(g, g_exact, dim=0) > 0.99
    # PEFT's own input casting is back on afterwards (generation and user code see the usual model)
    tuner_layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
    assert tuner_layers and all(getattr(m, "cast_input_dtype_enabled", True) for m in tuner_layers)


def test_auto_dtype_follows_the_cpu(monkeypatch):
    """model.dtype=auto: bf16 where the CPU multiplies bf16 in hardware, float32 elsewhere."""
    from pathlib import Path

    from alphadpo_cli.models.loading import cpu_has_native_bf16, resolve_dtype

    cpu_only = not torch.cuda.is_available()  # on a GPU machine auto means the GPU's precision
    monkeypatch.setenv("ALPHADPO_CPU_BF16", "1")
    assert cpu_has_native_bf16()
    assert resolve_dtype("auto") == torch.bfloat16 or not cpu_only
    monkeypatch.setenv("ALPHADPO_CPU_BF16", "0")
    assert not cpu_has_native_bf16()
    assert resolve_dtype("auto") == torch.float32 or not cpu_only
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    monkeypatch.delenv("ALPHADPO_CPU_BF16")
    info = Path("/proc/cpuinfo")
    flags = next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "") if info.exists() else ""
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
