"""TDPO's δ (`alpha_dpo_token_kl`, App. B.4) in the trainer: the chunked token-level KL(πref‖πθ) equals
`losses.sequence_kl` on full logits (padded and packed, adapter-disabled and separate reference), carries
no gradient, and the method trains end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from alphadpo_cli import losses
from alphadpo_cli.config import ConfigError, LoraConfig, ModelConfig, resolve_config
from alphadpo_cli.logps.layouts import PairCollator
from alphadpo_cli.data import TokenizeSettings, tokenize_split
from alphadpo_cli.io import cache_home
from alphadpo_cli.logps.sequence import SequenceLogps, response_token_kl, scorer_inputs
from alphadpo_cli.models.adapters import adapter_free
from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer, freeze, load_models
from alphadpo_cli.models.adapters import reference_mode
from alphadpo_cli.logps.layouts import PackedPairCollator
from alphadpo_cli.kernels.segment_attention import install_segment_attention
from alphadpo_cli.train.trainer import Trainer, train

CHUNK = 7  # far fewer rows than response tokens: many chunks


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    prefs = Path(__file__).resolve().parent / "fixtures" / "prefs"
    split = tokenize_split(str(prefs), "train", tok, TokenizeSettings(256, 128), max_samples=4, use_cache=False)
    return [split.dataset[i] for i in range(4)]


def _batch(layout, examples, tok):
    if layout == "padded":
        return PairCollator(tok.pad_token_id)(examples)
    return PackedPairCollator(tok.pad_token_id, prefix_sharing=layout == "packed_shared")(examples)


def _lora_policy(target_modules="all-linear"):
    with warnings.catch_warnings():  # LoRA on the (tied) LM head: peft warns about weight tying
        warnings.simplefilter("ignore")
        models = load_models(ModelConfig(dtype="fp32"), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=target_modules),
                             need_reference_model=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)  # adapters that really move the distribution: KL well above 0
    return models.policy


def _full_logits(model, padded):
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1].float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _close(a, b, rtol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= rtol * b.abs().max().item() + 1e-7, (a, b)


def _adapter_disabled_kl(policy, batch):
    """Chunked KL of a LoRA policy against its adapter-disabled self, as the trainer computes it."""
    scorer = SequenceLogps(policy, chunk_size=CHUNK)
    sums, counts, hidden, seq_ids = scorer(**scorer_inputs(batch), return_hidden=True)
    with torch.no_grad(), reference_mode(policy) as ref:
        rsums, _, ref_hidden, _ = SequenceLogps(ref, chunk_size=CHUNK)(**scorer_inputs(batch), return_hidden=True)
    head, softcap = scorer.output_head()
    kl = response_token_kl(adapter_free(head), ref_hidden, head, hidden, seq_ids, counts.shape[0],
                           chunk_size=CHUNK, softcap=softcap)
    return kl, sums, counts


def _oracle_adapter_disabled(policy, padded, *, grad=False):
    with torch.set_grad_enabled(grad):
        pol = _full_logits(policy, padded)
    with torch.no_grad(), reference_mode(policy) as ref:
        ref_logits = _full_logits(ref, padded)
    return losses.sequence_kl(ref_logits, pol, padded["response_mask"][:, 1:])


@pytest.mark.parametrize("layout", ["padded", "packed", "packed_shared"])
@pytest.mark.parametrize("lora_head", [False, True], ids=["plain_head", "lora_head"])
def test_chunked_kl_equals_full_logits_adapter_disabled(examples, tok, layout, lora_head):
    policy = _lora_policy(["q_proj", "v_proj", "down_proj", "lm_head"] if lora_head else "all-linear")
    head = policy.get_base_model().get_output_embeddings()
    assert (adapter_free(head) is not head) == lora_head
    if layout != "padded":
        install_segment_attention(policy)
    kl, _, counts = _adapter_disabled_kl(policy, _batch(layout, examples, tok))
    padded = _batch("padded", examples, tok)
    oracle = _oracle_adapter_disabled(policy, padded)
    assert torch.equal(counts, padded["response_mask"][:, 1:].sum(1).to(counts.dtype))
    assert (oracle > 1e-3 * counts).all()  # a real KL, not ~0
    assert not kl.requires_grad and kl.dtype == torch.float32
    _close(kl, oracle)


@pytest.mark.parametrize("layout", ["padded", "packed_shared"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_kl_equals_full_logits_separate_reference(examples, tok, layout, softcap):
    reference = build_tiny_model(ModelConfig(), len(tok))
    freeze(reference)
    policy = build_tiny_model(ModelConfig(), len(tok))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for net in (policy, reference):
        net.config.final_logit_softcapping = softcap
        if layout != "padded":
            install_segment_attention(net)
    batch = _batch(layout, examples, tok)
    scorer, ref_scorer = SequenceLogps(policy, chunk_size=CHUNK), SequenceLogps(reference, chunk_size=CHUNK)
    _, counts, hidden, seq_ids = scorer(**scorer_inputs(batch), return_hidden=True)
    with torch.no_grad():
        _, _, ref_hidden, _ = ref_scorer(**scorer_inputs(batch), return_hidden=True)
    head, cap = scorer.output_head()
    assert cap == softcap
    kl = response_token_kl(ref_scorer.output_head()[0], ref_hidden, head, hidden, seq_ids, counts.shape[0],
                           chunk_size=CHUNK, softcap=cap)
    padded = _batch("padded", examples, tok)
    with torch.no_grad():
        oracle = losses.sequence_kl(_full_logits(reference, padded), _full_logits(policy, padded),
                                    padded["response_mask"][:, 1:])
    assert (oracle > 1e-3 * counts).all()
    _close(kl, oracle)


def test_return_hidden_is_opt_in_and_matches_the_selected_positions(examples, tok):
    model = build_tiny_model(ModelConfig(), len(tok))
    scorer = SequenceLogps(model, chunk_size=CHUNK)
    padded = _batch("padded", examples, tok)
    plain = scorer(**scorer_inputs(padded))
    assert len(plain) == 2  # the default path returns what it always did
    sums, counts, hidden, seq_ids = scorer(**scorer_inputs(padded), return_hidden=True)
    assert torch.equal(sums, plain[0]) and torch.equal(counts, plain[1])
    assert hidden.shape == (int(counts.sum()), model.config.hidden_size) and not hidden.requires_grad
    assert torch.equal(torch.bincount(seq_ids, minlength=counts.shape[0]).to(counts.dtype), counts)


def test_bf16_head_takes_float32_hidden_states():
    """accelerate's mixed precision hands bf16 outputs back as float32: the head gets its own dtype."""
    torch.manual_seed(0)
    ref_head, head = nn.Linear(16, 50, bias=False).bfloat16(), nn.Linear(16, 50, bias=False).bfloat16()
    h_ref, h = torch.randn(9, 16).bfloat16(), torch.randn(9, 16).bfloat16()
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    a = response_token_kl(ref_head, h_ref.float(), head, h.float(), ids, 3, chunk_size=4)
    b = response_token_kl(ref_head, h_ref, head, h, ids, 3, chunk_size=4)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    with torch.no_grad():
        oracle = losses.sequence_kl(ref_head(h_ref).float().unsqueeze(0), head(h).float().unsqueeze(0),
                                    torch.ones(1, 9)).item()
    assert math.isclose(a.sum().item(), oracle, rel_tol=1e-5)


def test_no_graph_and_the_gradient_treats_the_margin_as_a_constant(examples, tok):
    policy = _lora_policy()
    padded = _batch("padded", examples, tok)
    b = padded["input_ids"].shape[0] // 2
    params = losses.make_params("alpha_dpo_token_kl")
    assert params.stop_gradient
    lora = [p for p in policy.parameters() if p.requires_grad]

    def grads(kl, sums, counts):
        with torch.no_grad(), reference_mode(policy) as ref:
            rs, _ = SequenceLogps(ref)(**scorer_inputs(padded))
        inputs = losses.PreferenceLogps(sums[:b], sums[b:], counts[:b], counts[b:], rs[:b], rs[b:],
                                        chosen_seq_kl=kl[:b], rejected_seq_kl=kl[b:])
        loss = losses.compute_loss("alpha_dpo_token_kl", inputs, params).losses.mean()
        return loss, torch.autograd.grad(loss, lora)

    kl, sums, counts = _adapter_disabled_kl(policy, padded)
    assert not kl.requires_grad and kl.grad_fn is None
    loss, g = grads(kl, sums, counts)
    # the oracle KL does carry a graph into πθ; with the (default) stop-gradient it must not matter
    oracle = _oracle_adapter_disabled(policy, padded, grad=True)
    assert oracle.requires_grad
    sums2, counts2 = SequenceLogps(policy, chunk_size=CHUNK)(**scorer_inputs(padded))
    loss2, g2 = grads(oracle, sums2, counts2)
    assert math.isclose(loss.item(), loss2.item(), rel_tol=1e-5)
    assert any(x is not None and x.abs().sum() > 0 for x in g)
    for x, y in zip(g, g2):
        assert x is not None and y is not None
        assert (x - y).abs().max().item() <= 1e-4 * y.abs().max().item() + 1e-8


# -- the trainer ---------------------------------------------------------------------------------


def _tiny(tmp_path, prefs_dir, *extra):
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=2",
            "data.max_samples=8", "data.max_eval_samples=4", "training.logging_steps=1", "training.warmup_ratio=0",
            "training.learning_rate=1e-2", "training.per_device_batch_size=4", "training.global_batch_size=4", *extra]
    return resolve_config(preset="tiny", overrides=sets, loss="alpha_dpo_token_kl")


def _check_run(cfg, res):
    assert res.steps == 2 and all(math.isfinite(x) for x in res.losses)
    rows = [json.loads(line) for line in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # step 1: a zero KL everywhere (policy == reference); once the policy moved the margins differ per pair
    assert rows[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-6) and rows[0]["kl/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl/chosen"] > 0 and rows[-1]["kl/rejected"] > 0  # the per-token KL is logged
    assert rows[-1]["margin/std"] > 0
    assert not (cache_home() / "reference").exists()  # nothing precomputed: the reference ran online


@pytest.mark.parametrize("packing", ["true", "false"])
def test_trains_with_lora_and_adapter_disabled_reference(tmp_path, prefs_dir, packing):
    cfg = _tiny(tmp_path, prefs_dir, f"training.packing={packing}")  # precompute_ref stays true (the preset's)
    assert cfg.training.precompute_ref
    _check_run(cfg, train(cfg))


def test_trains_full_finetuning_with_separate_reference(tmp_path, prefs_dir):
    cfg = _tiny(tmp_path, prefs_dir, "model.mode=full")
    tr = Trainer(cfg)
    res = tr.run()
    assert tr.models.reference is not None  # loaded although precompute_ref was asked for
    _check_run(cfg, res)


def test_plan_says_the_reference_runs_online(tmp_path, prefs_dir):
    plan = train(_tiny(tmp_path, prefs_dir), dry_run=True)
    assert plan.needs_reference
    assert plan.reference.startswith("online (adapters disabled)") and "token-level KL" in plan.reference
    assert "precompute_ref ignored" in plan.reference


def test_stop_gradient_false_is_refused(tmp_path, prefs_dir):
    with pytest.raises(ConfigError, match="stop_gradient"):
        Trainer(_tiny(tmp_path, prefs_dir, "loss.params.stop_gradient=false"))


def test_eval_updates_stats_is_refused(tmp_path, prefs_dir):
    with pytest.raises(ConfigError, match="eval_updates_stats"):
        Trainer(_tiny(tmp_path, prefs_dir, "loss.params.eval_updates_stats=true"))


def test_margin_source_param_turns_token_kl_on_and_off(tmp_path, prefs_dir):
    on = resolve_config(preset="tiny", overrides=[f"data.dataset={prefs_dir}", "loss.params.margin_source=token_kl"])
    assert Trainer(on).token_kl and Trainer(on).online_reference
    off = _tiny(tmp_path, prefs_dir, "loss.params.margin_source=sequence")
    assert not Trainer(off).token_kl and not Trainer(off).online_reference
