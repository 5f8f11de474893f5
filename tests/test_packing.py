"""Padding-free packing and prefix sharing give the padded path's per-sequence log-probs (1e-5, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alphadpo_cli.config import LoraConfig, ModelConfig
from alphadpo_cli.kernels import segment_attention
from alphadpo_cli.kernels.segment_attention import SegmentPlan, install_segment_attention
from alphadpo_cli.logps.layouts import PackedPairCollator, PairCollator, build_layout, packed_length, token_budget_batches
from alphadpo_cli.logps.scoring import score_pairs
from alphadpo_cli.logps.sequence import SequenceLogps, batch_tokens, reference_full_logps, scorer_inputs
from alphadpo_cli.models.adapters import reference_mode
from alphadpo_cli.models.loading import build_tiny_model, load_models


@pytest.fixture(scope="module")
def examples(tiny_split):
    split = tiny_split(6)
    return split, [split.dataset[i] for i in range(6)]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close_grads(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for n in a:
        scale = b[n].abs().max().item()
        assert (a[n] - b[n]).abs().max().item() <= atol + rtol * scale, n


def test_layout_by_hand():
    # prompt [1 2 3], chosen [4 5], rejected [6 7 8]
    lay = build_layout([([1, 2, 3], [4, 5], [6, 7, 8])], prefix_sharing=True)
    assert lay.input_ids == [1, 2, 3, 4, 6, 7]  # last token of each response is not fed
    assert lay.position_ids == [0, 1, 2, 3, 3, 4]  # rejected continues after the prompt
    assert lay.segments == [(0, 4, 0, 0), (4, 6, 0, 3)]
    assert lay.target_labels == [4, 5, 6, 7, 8]
    assert lay.target_index == [2, 3, 2, 4, 5]  # rejected's first token is predicted from the prompt's end
    assert lay.target_seq == [0, 0, 1, 1, 1]
    plain = build_layout([([1, 2, 3], [4, 5], [6, 7, 8])], prefix_sharing=False)
    assert plain.input_ids == [1, 2, 3, 4, 1, 2, 3, 6, 7]
    assert plain.position_ids == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert plain.segments == [(0, 4, 0, 0), (4, 9, 0, 0)]
    assert plain.target_index == [2, 3, 6, 7, 8]
    assert len(lay) == packed_length(3, 2, 3, True) and len(plain) == packed_length(3, 2, 3, False)
    # one-token responses: nothing fed beyond the prompt, still scored
    one = build_layout([([1, 2], [9], [8])], prefix_sharing=True)
    assert one.input_ids == [1, 2] and one.segments == [(0, 2, 0, 0)]
    assert one.target_index == [1, 1] and one.target_labels == [9, 8]


@pytest.mark.parametrize("prefix_sharing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_equals_padded(examples, tok, prefix_sharing, dtype):
    _, exs = examples
    model = build_tiny_model(ModelConfig(), len(tok)).to(dtype)
    scorer = SequenceLogps(model, chunk_size=7)
    padded = PairCollator(tok.pad_token_id)(exs)
    ref_sums, ref_counts = scorer(**scorer_inputs(padded))
    ref_sums.sum().backward()
    ref_grads = _grads(model)
    model.zero_grad()

    install_segment_attention(model)
    packed = PackedPairCollator(tok.pad_token_id, prefix_sharing=prefix_sharing)(exs)
    assert packed["input_ids"].shape[0] == 1 and batch_tokens(packed) < batch_tokens(padded) + (0 if prefix_sharing else 1)
    sums, counts = scorer(**scorer_inputs(packed))
    sums.sum().backward()
    grads = _grads(model)

    assert torch.equal(counts, ref_counts)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    # per sequence, and per token (the sums run to ~-800, so compare them relatively too)
    assert torch.allclose(sums, ref_sums, rtol=tol, atol=tol)
    assert torch.allclose(sums / counts, ref_sums / ref_counts, rtol=0, atol=tol)
    # Llama's RMSNorm runs in float32 even in a float64 model: with a shared prompt its backward sums
    # the chosen and rejected contributions before that float32 step instead of after it.
    _close_grads(grads, ref_grads, rtol=1e-4 if dtype == torch.float32 else 1e-6)


def test_padded_path_unchanged_by_install(examples, tok):
    _, exs = examples
    model = build_tiny_model(ModelConfig(), len(tok))
    batch = PairCollator(tok.pad_token_id)(exs)
    with torch.no_grad():
        before, _ = SequenceLogps(model)(**scorer_inputs(batch))
        full, _ = reference_full_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        name = install_segment_attention(model)
        assert install_segment_attention(model) == name  # idempotent
        after, _ = SequenceLogps(model)(**scorer_inputs(batch))
        full_after, _ = reference_full_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert torch.equal(before, after) and torch.equal(full, full_after)


def test_packed_batch_needs_install(examples, tok):
    _, exs = examples
    model = build_tiny_model(ModelConfig(), len(tok))
    with pytest.raises(RuntimeError, match="install_segment_attention"):
        SequenceLogps(model)(**scorer_inputs(PackedPairCollator(tok.pad_token_id)(exs)))


def test_lora_policy_and_adapter_disabled_reference(examples, tok):
    """Through peft, with gradient checkpointing (the segment plan must survive recomputation)."""
    _, exs = examples
    models = load_models(ModelConfig(gradient_checkpointing=True), LoraConfig(r=4, alpha=8, dropout=0.0),
                         need_reference_model=False)
    policy = models.policy
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    padded = PairCollator(tok.pad_token_id)(exs)
    scorer = SequenceLogps(policy, chunk_size=16)
    ref_sums, _ = scorer(**scorer_inputs(padded))
    ref_sums.sum().backward()
    ref_grads = _grads(policy)
    policy.zero_grad()
    with torch.no_grad(), reference_mode(policy) as net:
        ref_base, _ = SequenceLogps(net)(**scorer_inputs(padded))

    install_segment_attention(policy)
    packed = PackedPairCollator(tok.pad_token_id)(exs)
    sums, _ = scorer(**scorer_inputs(packed))
    sums.sum().backward()
    assert torch.allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    _close_grads(_grads(policy), ref_grads)
    with torch.no_grad(), reference_mode(policy) as net:
        base, _ = SequenceLogps(net)(**scorer_inputs(packed))
    assert torch.allclose(base, ref_base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, sums, atol=1e-3)


def test_reference_precompute_packed_equals_padded(examples, tok):
    split, _ = examples
    model = build_tiny_model(ModelConfig(), len(tok))
    padded = score_pairs(model, split, pad_token_id=tok.pad_token_id, batch_size=4, longest_first=True)
    for budget in (64, 100_000):  # one pair per row (over budget), and everything in one row
        packed = score_pairs(model, split, packed=True, token_budget=budget)
        for k in ("policy_chosen_logps", "policy_rejected_logps"):
            assert torch.allclose(getattr(packed, k), getattr(padded, k), rtol=1e-5, atol=1e-5), k
        for k in ("chosen_lengths", "rejected_lengths"):
            assert torch.equal(getattr(packed, k), getattr(padded, k)), k


def test_token_budget_batches():
    lengths = [5, 50, 20, 30, 10, 200]
    batches = token_budget_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # too long for the budget: alone
    for b in batches[1:]:
        assert sum(lengths[i] for i in b) <= 60
    assert token_budget_batches(lengths, 10_000, max_pairs=2) == [[5, 1], [3, 2], [4, 0]]


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (None, 0.5), (4, 0.5)])
def test_varlen_gather_matches_per_segment_sdpa(window, softcap):
    """The CUDA varlen layout (gathered keys, cu_seqlens, bottom-right causal, the window as
    (window - 1, 0), the soft-cap), through a stand-in with flash_attn_varlen_func's signature, on CPU."""
    torch.manual_seed(0)
    lay = build_layout([([1, 2, 3, 4], [5, 6, 7], [8, 9]), ([1, 2], [3, 4, 5, 6], [7, 8, 9, 10])], prefix_sharing=True)
    plan = SegmentPlan(lay.segments, torch.device("cpu"), lay.position_ids)
    T, H, Hkv, D = len(lay), 4, 2, 8
    q, k, v = torch.randn(1, H, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    seen = []

    def emulated(qf, kf, vf, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                 window_size=(-1, -1), softcap=0.0):  # FlashAttention varlen semantics
        seen.append((causal, tuple(window_size), softcap))
        outs = []
        for j in range(len(cu_q) - 1):
            qq = qf[cu_q[j]:cu_q[j + 1]].transpose(0, 1)
            kk = kf[cu_k[j]:cu_k[j + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0)
            vv = vf[cu_k[j]:cu_k[j + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0)
            lq, lk = qq.shape[1], kk.shape[1]
            s = qq @ kk.transpose(1, 2) * softmax_scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)  # bottom-right causal
            if window_size[0] >= 0:
                mask &= torch.ones(lq, lk, dtype=torch.bool).triu(diagonal=lk - lq - window_size[0])
            outs.append((s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv).transpose(0, 1))
        return torch.cat(outs)

    kernel = segment_attention.VarlenKernel("flash_attn", emulated, softcap=True, dropout=True)
    got = segment_attention._segment_attention_varlen(kernel, q, k, v, plan, 0.3, softcap=softcap, window=window)
    want = segment_attention._segment_attention_sdpa(None, q, k, v, plan, 0.3, softcap=softcap, window=window)
    assert seen == [(True, (window - 1, 0) if window else (-1, -1), softcap or 0.0)]
    assert got.shape == want.shape == (1, T, H, D)
    assert torch.allclose(got, want, atol=1e-6)
    if window or softcap:  # the feature changes the result
        plain = segment_attention._segment_attention_sdpa(None, q, k, v, plan, 0.3)
        assert not torch.allclose(plain, want, atol=1e-3)


def test_an_attention_that_never_reaches_the_kernel_is_a_problem():
    plan = SegmentPlan([(0, 3, 0, 0)], torch.device("cpu"))
    assert "never reached" in plan.problem()
    plan.calls = 2
    assert plan.problem() is None
    plan.unsupported["s_aux"] = "Tensor"
    assert "s_aux" in plan.problem()


def test_training_packed_and_padded_give_the_same_losses(tmp_path):
    from alphadpo_cli.config import resolve_config
    from alphadpo_cli.train.trainer import train

    prefs = Path(__file__).resolve().parent / "fixtures" / "prefs"
    losses = {}
    for name, sets in {"padded": ["training.packing=false"],
                       "packed": ["training.packing=true", "training.prefix_sharing=false"],
                       "shared": ["training.packing=true", "training.prefix_sharing=true", "training.token_budget=200"]}.items():
        cfg = resolve_config(preset="tiny", loss="dpo", overrides=[
            f"data.dataset={prefs}", f"training.output_dir={tmp_path / name}", "training.max_steps=3",
            "data.max_samples=12", "data.eval_split=null", "training.warmup_ratio=0", *sets])
        losses[name] = train(cfg).losses
    assert len(losses["padded"]) == 3
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-4, abs=1e-5)
    assert losses["shared"] == pytest.approx(losses["padded"], rel=1e-4, abs=1e-5)
    assert losses["padded"][2] != pytest.approx(losses["padded"][0], abs=1e-4)  # it did train
