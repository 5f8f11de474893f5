"""Packed scoring computes what each architecture the presets name defines (tiny fp32 models from a config).

The oracle is the unpatched model's own forward, one sequence at a time (its logits, log-softmax, the
response tokens' log-probs summed). Checked for Llama, Mistral with a short sliding window, and Gemma-2
with its attention soft-cap (weights scaled so that the cap matters), its final-logit soft-cap and its
sliding-window layers: packed (with and without prefix sharing) and padded equal the oracle, and the
model's own forward is bit for bit the same before, while and after the packed kernels are installed.
Also: the FlashAttention-varlen plumbing through stand-ins with the public signatures of torch's
`varlen_attn` and flash-attn's `flash_attn_varlen_func` (they emulate FlashAttention's documented
semantics and record their arguments), gradients through checkpointed layers, an attention extra the
kernels do not implement (padded fallback, one notice), and the Gemma-2 preset's own settings.
"""

from __future__ import annotations

import pytest
import torch

from alphadpo_cli.config import resolve_config
from alphadpo_cli.kernels import segment_attention as sa
from alphadpo_cli.kernels import segment_varlen
from alphadpo_cli.kernels.segment_attention import (install_segment_attention, packed_fallback_reason,
                                                    uninstall_segment_attention, uses_segment_attention)
from alphadpo_cli.logps import sequence
from alphadpo_cli.logps.layouts import PackedPairCollator, PairCollator
from alphadpo_cli.logps.scoring import score_pairs
from alphadpo_cli.logps.sequence import SequenceLogps, scorer_inputs
from alphadpo_cli.models.checkpointing import enable_checkpointing
from alphadpo_cli.models.loading import resolve_attn_implementation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 12
PAIRS = 4


def _tiny(arch: str, vocab: int, attn: str | None = None, seed: int = 0):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    extra = {"attn_implementation": attn} if attn else {}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, **extra))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, head_dim=8, sliding_window=WINDOW, **extra))
        with torch.no_grad():
            for layer in model.model.layers:  # sharp, weighty attention: what the window cuts off matters
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, proj).weight.mul_(4.0)
    else:  # Gemma-2: layer 0 sliding, layer 1 global; both soft-caps small so that they bind
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                               attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
                                               **({"attn_implementation": attn or "eager"})))
        with torch.no_grad():
            for layer in model.model.layers:  # scores of several units: the cap at 1.0 changes them
                layer.self_attn.q_proj.weight.mul_(6.0)
                layer.self_attn.k_proj.weight.mul_(6.0)
    return model.float().eval()


def _examples(tiny_split):
    split = tiny_split(PAIRS)
    return split, [split.dataset[i] for i in range(PAIRS)]


def _own_forward_sums(model, exs) -> torch.Tensor:
    """Per-sequence response log-prob sums from the model's own forward, one sequence at a time:
    chosen 0..B-1, then rejected."""
    out = []
    with torch.no_grad():
        for side in ("chosen_ids", "rejected_ids"):
            for ex in exs:
                prompt, resp = list(ex["prompt_ids"]), list(ex[side])
                ids = torch.tensor([prompt + resp])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
                out.append(logp[pos, ids[0, pos + 1]].sum())
    return torch.stack(out)


def _packed_sums(model, exs, prefix_sharing: bool, chunk_size=None) -> torch.Tensor:
    with torch.no_grad():
        sums, _ = SequenceLogps(model, chunk_size=chunk_size)(**scorer_inputs(
            PackedPairCollator(prefix_sharing=prefix_sharing)(exs)))
    return sums


def _padded_sums(model, exs, tok) -> torch.Tensor:
    with torch.no_grad():
        sums, _ = SequenceLogps(model)(**scorer_inputs(PairCollator(tok.pad_token_id)(exs)))
    return sums


def _own_logits(model, exs, tok) -> torch.Tensor:
    batch = PairCollator(tok.pad_token_id)(exs)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _close(got, want):
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max().item()


def _longest(exs) -> int:
    return max(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in exs)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_packed_and_padded_equal_the_models_own_forward(arch, tiny_split, tok):
    split, exs = _examples(tiny_split)
    model = _tiny(arch, len(tok))
    assert _longest(exs) > 3 * WINDOW  # the window cuts every sequence
    oracle = _own_forward_sums(model, exs)
    logits_before = _own_logits(model, exs, tok)

    _close(_padded_sums(model, exs, tok), oracle)
    install_segment_attention(model)
    assert torch.equal(_own_logits(model, exs, tok), logits_before)  # installed, no plan: untouched
    for share in (True, False):
        _close(_packed_sums(model, exs, share, chunk_size=7), oracle)
        assert torch.equal(_own_logits(model, exs, tok), logits_before)  # after a packed call too
    _close(_padded_sums(model, exs, tok), oracle)
    uninstall_segment_attention(model)
    assert not uses_segment_attention(model)
    assert torch.equal(_own_logits(model, exs, tok), logits_before)

    # the packed reference precompute: installs for the call only, leaves the model as it found it
    scored = score_pairs(model, split, packed=True, token_budget=200)
    assert not uses_segment_attention(model)
    _close(torch.cat([scored.policy_chosen_logps, scored.policy_rejected_logps]).float(), oracle)
    assert torch.equal(_own_logits(model, exs, tok), logits_before)
    assert packed_fallback_reason(model) is None  # computed packed, not through the fallback


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_the_features_matter_here(arch, tiny_split, tok):
    """The models above are sensitive to what the kernels must implement: without the window (and for
    Gemma-2 without the attention soft-cap) the model's own log-probs move by 1000x the tolerance or more."""
    _, exs = _examples(tiny_split)
    model = _tiny(arch, len(tok))
    oracle = _own_forward_sums(model, exs)
    attns = [layer.self_attn for layer in model.model.layers]
    caps = [getattr(a, "attn_logit_softcapping", None) for a in attns]
    if arch == "mistral":
        model.config.sliding_window = None  # read at every call
        assert (_own_forward_sums(model, exs) - oracle).abs().max() > 0.1  # 1000x the tolerance
        model.config.sliding_window = WINDOW
    else:
        for a in attns:
            a.attn_logit_softcapping = None
        assert (_own_forward_sums(model, exs) - oracle).abs().max() > 0.1
        for a, c in zip(attns, caps):
            a.attn_logit_softcapping = c
        assert attns[0].sliding_window == WINDOW and attns[1].sliding_window is None  # sliding, then global
    _close(_own_forward_sums(model, exs), oracle)


def test_gradients_through_checkpointed_gemma2_layers(tiny_split, tok):
    """Activation checkpointing recomputes each layer in backward, after the packed forward returned:
    the recompute must run the same soft-capped, windowed segment kernel."""
    _, exs = _examples(tiny_split)
    model = _tiny("gemma2", len(tok)).train()
    enable_checkpointing(model)
    for layer in model.model.layers:
        layer.gradient_checkpointing = True
    scorer = SequenceLogps(model, chunk_size=16)
    ref, _ = scorer(**scorer_inputs(PairCollator(tok.pad_token_id)(exs)))
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    install_segment_attention(model)
    sums, _ = scorer(**scorer_inputs(PackedPairCollator(prefix_sharing=True)(exs)))
    sums.sum().backward()
    _close(sums.detach(), ref.detach())
    assert ref_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in ref_grads.items():
        got = dict(model.named_parameters())[n].grad
        assert (got - g).abs().max() <= 1e-5 + 1e-4 * g.abs().max(), n


# -- FlashAttention varlen plumbing, through stand-ins ---------------------------------------------


def _fa_reference(q, k, v, cu_q, cu_k, scale, causal, window, softcap):
    """FlashAttention's documented varlen semantics: query i of a sequence sees keys
    [i + Lk - Lq - left, i + Lk - Lq + right] (bottom-right aligned), -1 meaning unbounded; the soft-cap
    tanh(s / cap) * cap on the scaled scores; query head h reads key head h // (Hq / Hkv)."""
    left, right = window
    if causal:
        right = 0
    groups = q.shape[1] // k.shape[1]
    outs = []
    for j in range(len(cu_q) - 1):
        qq = q[cu_q[j]:cu_q[j + 1]].transpose(0, 1)
        kk = k[cu_k[j]:cu_k[j + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        vv = v[cu_k[j]:cu_k[j + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        lq, lk = qq.shape[1], kk.shape[1]
        s = (qq @ kk.transpose(1, 2)) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        i = torch.arange(lq)[:, None] + lk - lq
        jj = torch.arange(lk)[None, :]
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if left >= 0:
            keep &= jj >= i - left
        if right >= 0:
            keep &= jj <= i + right
        s = s.masked_fill(~keep, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vv).transpose(0, 1))
    return torch.cat(outs)


class _Recorder:
    def __init__(self):
        self.calls = []

    def torch_varlen(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        """torch.nn.attention.varlen.varlen_attn's signature; (-1, 0) is causal, (W, 0) a causal window."""
        self.calls.append(("torch", {"scale": scale, "window_size": tuple(window_size), "enable_gqa": enable_gqa,
                                     "max_q": max_q, "max_k": max_k}))
        assert enable_gqa or query.shape[1] == key.shape[1]
        return _fa_reference(query, key, value, cu_seq_q.tolist(), cu_seq_k.tolist(),
                             scale if scale is not None else query.shape[-1] ** -0.5, False, tuple(window_size), 0.0)

    def flash_attn(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                   deterministic=False, return_attn_probs=False, block_table=None):
        """flash_attn.flash_attn_varlen_func's signature (flash-attn >= 2.6)."""
        self.calls.append(("flash_attn", {"softmax_scale": softmax_scale, "causal": causal,
                                          "window_size": tuple(window_size), "softcap": softcap,
                                          "dropout_p": dropout_p}))
        return _fa_reference(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(),
                             softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5, causal,
                             tuple(window_size), softcap)


@pytest.fixture
def varlen_standins(monkeypatch):
    """`use(torch=..., flash_attn=...)` puts stand-ins in the kernel's varlen slot, used on CPU."""
    def use(torch_op: bool = True, flash_attn: bool = True):
        rec = _Recorder()
        kernels = []
        if torch_op:
            kernels.append(sa.VarlenKernel("torch", rec.torch_varlen, softcap=False, dropout=False))
        if flash_attn:
            kernels.append(sa.VarlenKernel("flash_attn", rec.flash_attn, softcap=True, dropout=True))
        monkeypatch.setattr(segment_varlen, "_VARLEN", tuple(kernels))
        monkeypatch.setattr(segment_varlen, "USE_VARLEN", True)
        return rec

    return use


def _varlen_calls(varlen_standins, tiny_split, tok, arch: str, *, flash_attn: bool) -> list:
    """The varlen calls of one packed scoring of a tiny `arch` model (torch's op available, flash-attn's
    if `flash_attn`), after checking that its sums equal the model's own forward."""
    _, exs = _examples(tiny_split)
    model = _tiny(arch, len(tok))
    oracle = _own_forward_sums(model, exs)
    rec = varlen_standins(torch_op=True, flash_attn=flash_attn)
    install_segment_attention(model)
    _close(_packed_sums(model, exs, True), oracle)
    return rec.calls


def test_varlen_plumbing_mistral_window(varlen_standins, tiny_split, tok):
    calls = _varlen_calls(varlen_standins, tiny_split, tok, "mistral", flash_attn=False)
    assert len(calls) == 2  # one call per layer
    for kind, kw in calls:
        assert kind == "torch" and kw["window_size"] == (WINDOW - 1, 0) and kw["enable_gqa"]
        assert kw["scale"] == pytest.approx(8 ** -0.5)


def test_varlen_plumbing_llama_causal(varlen_standins, tiny_split, tok):
    calls = _varlen_calls(varlen_standins, tiny_split, tok, "llama", flash_attn=True)
    assert [(k, kw["window_size"]) for k, kw in calls] == [("torch", (-1, 0))] * 2


def test_varlen_plumbing_gemma2_softcap_and_window(varlen_standins, tiny_split, tok):
    """torch's varlen_attn has no soft-cap: Gemma-2 goes to flash_attn_varlen_func with the cap, the
    module's scaling and each layer's window (sliding layer, then global)."""
    calls = _varlen_calls(varlen_standins, tiny_split, tok, "gemma2", flash_attn=True)
    assert [k for k, _ in calls] == ["flash_attn"] * 2
    (_, sliding), (_, full) = calls
    for kw in (sliding, full):
        assert kw["softcap"] == 1.0 and kw["causal"] and kw["dropout_p"] == 0.0
        assert kw["softmax_scale"] == pytest.approx(8 ** -0.5)  # query_pre_attn_scalar ** -0.5
    assert sliding["window_size"] == (WINDOW - 1, 0) and full["window_size"] == (-1, -1)


def test_gemma2_without_a_softcap_capable_varlen_runs_the_explicit_path(varlen_standins, tiny_split, tok):
    assert _varlen_calls(varlen_standins, tiny_split, tok, "gemma2", flash_attn=False) == []


def test_attention_dropout_reaches_the_kernel(varlen_standins, tiny_split, tok):
    """In training, the module's attention dropout goes to flash_attn_varlen_func (torch's op has none:
    without flash-attn the per-segment path applies it); outside training the module passes 0."""
    _, exs = _examples(tiny_split)
    model = _tiny("llama", len(tok))
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.25
    install_segment_attention(model)
    rec = varlen_standins(torch_op=True, flash_attn=True)
    _packed_sums(model.train(), exs, True)
    assert [(k, kw["dropout_p"]) for k, kw in rec.calls] == [("flash_attn", 0.25)] * 2
    rec = varlen_standins(torch_op=True, flash_attn=False)
    torch.manual_seed(0)
    a = _packed_sums(model, exs, True)
    torch.manual_seed(1)
    assert rec.calls == [] and not torch.allclose(a, _packed_sums(model, exs, True))  # dropped at random
    _close(_packed_sums(model.eval(), exs, True), _own_forward_sums(model, exs))


# -- an attention extra the kernels do not implement ------------------------------------------------


def _tempered_sdpa(module, query, key, value, attention_mask, head_temperature=None, **kwargs):
    """sdpa with a per-head query temperature: an extra keyword the packed kernels know nothing of."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if head_temperature is not None:
        query = query * head_temperature.view(1, -1, 1, 1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _tempered_llama(vocab: int):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("test_tempered_attention", _tempered_sdpa)
    AttentionMaskInterface.register("test_tempered_attention", sdpa_mask)
    model = _tiny("llama", vocab, attn="test_tempered_attention")
    temps = torch.tensor([0.2, 6.0, 1.0, 4.0])
    for layer in model.model.layers:
        attn = layer.self_attn
        with torch.no_grad():
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.mul_(4.0)

        def forward(*args, _own=attn.forward, **kwargs):  # the module passes the extra to its attention
            return _own(*args, head_temperature=temps, **kwargs)

        attn.forward = forward
    return model, temps


def test_an_unknown_attention_extra_falls_back_to_padded_once(tiny_split, tok, monkeypatch):
    split, exs = _examples(tiny_split)
    model, temps = _tempered_llama(len(tok))
    oracle = _own_forward_sums(model, exs)
    saved = temps.clone()
    temps.fill_(1.0)  # without the extra's effect: it matters
    assert (_own_forward_sums(model, exs) - oracle).abs().max() > 0.1
    temps.copy_(saved)
    notices = []
    monkeypatch.setattr(sequence, "notice", notices.append)
    _close(_padded_sums(model, exs, tok), oracle)

    install_segment_attention(model)
    assert packed_fallback_reason(model) is None
    for share in (True, False):
        _close(_packed_sums(model, exs, share), oracle)
    scored = score_pairs(model, split, packed=True, token_budget=150)  # several packed forwards
    _close(torch.cat([scored.policy_chosen_logps, scored.policy_rejected_logps]).float(), oracle)
    assert "head_temperature" in packed_fallback_reason(model)
    assert len(notices) == 1 and "head_temperature" in notices[0] and "padded" in notices[0]


def test_packed_gradients_through_the_fallback_equal_padded(tiny_split, tok, monkeypatch):
    _, exs = _examples(tiny_split)
    model = _tempered_llama(len(tok))[0].train()
    monkeypatch.setattr(sequence, "notice", lambda m: None)
    scorer = SequenceLogps(model)
    ref, _ = scorer(**scorer_inputs(PairCollator(tok.pad_token_id)(exs)))
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    install_segment_attention(model)
    sums, _ = scorer(**scorer_inputs(PackedPairCollator(prefix_sharing=True)(exs)))
    sums.sum().backward()
    _close(sums.detach(), ref.detach())
    for n, p in model.named_parameters():
        assert (p.grad - ref_grads[n]).abs().max() <= 1e-5 + 1e-4 * ref_grads[n].abs().max(), n


# -- the Gemma-2 preset ---------------------------------------------------------------------------


def test_gemma2_preset_packed_scoring_computes_what_gemma2_defines(tiny_split, tok):
    """gemma2-instruct's own settings (its attention implementation, packing and prefix sharing, its
    token budget) on a tiny Gemma-2: the packed scores are the model's own."""
    cfg = resolve_config(preset="gemma2-instruct")
    assert cfg.training.packing and cfg.training.prefix_sharing  # the preset packs, so this is its path
    attn = resolve_attn_implementation(cfg.model.attn_implementation, torch.float32)
    assert attn == "eager"
    split, exs = _examples(tiny_split)
    model = _tiny("gemma2", len(tok), attn=attn)
    oracle = _own_forward_sums(model, exs)
    scored = score_pairs(model, split, packed=cfg.training.packing, prefix_sharing=cfg.training.prefix_sharing,
                         token_budget=cfg.training.token_budget)
    _close(torch.cat([scored.policy_chosen_logps, scored.policy_rejected_logps]).float(), oracle)
    assert packed_fallback_reason(model) is None
