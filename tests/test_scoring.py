"""The one per-pair scoring path (`logps.scoring`) and the reference cache (`logps.cache`)."""

from __future__ import annotations

import pytest
import torch

from alphadpo_cli.config import LoraConfig, ModelConfig
from alphadpo_cli.logps.cache import ReferenceCache, cache_key
from alphadpo_cli.logps.layouts import PairCollator
from alphadpo_cli.logps.scoring import preference_report, score_pairs, score_with_reference
from alphadpo_cli.logps.sequence import SequenceLogps
from alphadpo_cli.losses import PreferenceLogps
from alphadpo_cli.models.adapters import reference_mode
from alphadpo_cli.models.loading import build_tiny_model, load_models


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(ModelConfig(), len(tok)).eval()


def _direct(model, split, positions, pad_id):
    """The sums and counts of one forward over exactly these pairs (the oracle)."""
    b = PairCollator(pad_id)([split.dataset[i] for i in positions])
    with torch.no_grad():
        return SequenceLogps(model)(b["input_ids"], b["attention_mask"], b["response_mask"])


@pytest.mark.parametrize("layout", ["split order", "longest first", "packed"])
def test_scores_land_at_their_pairs_positions(model, tok, tiny_split, layout):
    split = tiny_split(7)
    kw = {"packed": True, "token_budget": 150} if layout == "packed" else {
        "batch_size": 3, "longest_first": layout == "longest first"}
    seen = []
    scores = score_pairs(model, split, pad_token_id=tok.pad_token_id, progress=lambda d, n: seen.append((d, n)), **kw)
    assert scores.policy_chosen_logps.dtype == torch.float64 and scores.policy_chosen_logps.shape == (7,)
    assert seen[-1] == (7, 7) and all(a < b for (a, _), (b, _) in zip(seen, seen[1:]))
    for i in range(7):  # each pair alone: no batching effect on the oracle
        s, c = _direct(model, split, [i], tok.pad_token_id)
        assert scores.policy_chosen_logps[i].item() == pytest.approx(s[0].item(), rel=1e-5)
        assert scores.policy_rejected_logps[i].item() == pytest.approx(s[1].item(), rel=1e-5)
        assert scores.chosen_lengths[i].item() == c[0].item() and scores.rejected_lengths[i].item() == c[1].item()
    assert scores.ref_chosen_logps is None


def test_score_with_reference_uses_the_adapter_disabled_policy(tok, tiny_split):
    models = load_models(ModelConfig(), LoraConfig(), need_reference_model=False)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # adapters that change the output
    split = tiny_split(4)
    models.policy.train()
    scores = score_with_reference(models.policy, split, pad_token_id=tok.pad_token_id, batch_size=2)
    assert models.policy.training  # the mode is given back
    with reference_mode(models.policy) as net:
        base = score_pairs(net, split, pad_token_id=tok.pad_token_id)
    assert torch.equal(scores.ref_chosen_logps, base.policy_chosen_logps)
    assert not torch.allclose(scores.policy_chosen_logps, base.policy_chosen_logps, atol=1e-3)
    given = base.select(torch.arange(4)).to(dtype=torch.float64)
    again = score_with_reference(models.policy, split, reference_scores=given, pad_token_id=tok.pad_token_id)
    assert torch.equal(again.ref_rejected_logps, base.policy_rejected_logps)
    alone = score_with_reference(models.policy, split, with_reference=False, pad_token_id=tok.pad_token_id)
    assert alone.ref_chosen_logps is None and preference_report(alone)["accuracy_ref"] is None


def test_preference_report_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    s = PreferenceLogps(t(-4.0, -9.0), t(-6.0, -3.0), t(2.0, 3.0), t(2.0, 1.0), t(-5.0, -9.0), t(-5.0, -4.0))
    r = preference_report(s)
    # averaged: chosen (-2, -3), rejected (-3, -3): one win, one tie
    assert r["accuracy"] == 0.75 and r["reward_margin"] == pytest.approx(0.5)
    # reference-relative: chosen (1, 0), rejected (-1, 1): one win, one loss
    assert r["accuracy_ref"] == 0.5 and r["ref_reward_margin"] == pytest.approx((2 - 1) / 2)
    assert r["logratio_per_token"] == pytest.approx(((1 - 1) / 4 + (0 + 1) / 4) / 2)


def test_select_to_and_with_reference():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    a = PreferenceLogps(t(1.0, 2.0, 3.0), t(4.0, 5.0, 6.0), t(1.0, 1.0, 2.0), t(2.0, 2.0, 2.0))
    ref = PreferenceLogps(t(7.0, 8.0, 9.0), t(0.5, 0.6, 0.7), a.chosen_lengths, a.rejected_lengths)
    both = a.with_reference(ref)
    assert torch.equal(both.ref_chosen_logps, ref.policy_chosen_logps)
    assert torch.equal(both.ref_rejected_logps, ref.policy_rejected_logps)
    sub = both.select(torch.tensor([2, 0]))
    assert sub.policy_chosen_logps.tolist() == [3.0, 1.0] and sub.ref_rejected_logps.tolist() == pytest.approx([0.7, 0.5])
    assert sub.chosen_seq_kl is None
    assert both.to(dtype=torch.float64).ref_chosen_logps.dtype == torch.float64
    assert both.with_reference(None).ref_chosen_logps is None


def test_reference_cache_get_or_compute(tmp_path, tiny_split):
    split = tiny_split(3)
    cache = ReferenceCache(tmp_path / "ref")
    key = cache_key("fp", split, torch.float32)
    assert key != cache_key("fp2", split, torch.float32) and key != cache_key("fp", split, torch.bfloat16)
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    made = PreferenceLogps(t(-1.0, -2.0, -3.0), t(-4.0, -5.0, -6.0), t(1.0, 2.0, 3.0), t(3.0, 2.0, 1.0))
    calls = []

    def compute():
        calls.append(1)
        return made

    first, hit = cache.get_or_compute(key, 3, compute, meta={"rows": 3})
    assert not hit and first is made and calls == [1]
    second, hit = cache.get_or_compute(key, 3, compute, meta={"rows": 3})
    assert hit and calls == [1] and torch.equal(second.policy_rejected_logps, made.policy_rejected_logps)
    # another row count, a disagreeing process, or a corrupted file: computed again, never trusted
    assert cache.get_or_compute(key, 4, compute, meta={})[1] is False
    assert cache.get_or_compute(key, 3, compute, meta={}, agree=lambda hit: False)[1] is False
    f = cache.path(key) / "logps.safetensors"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    assert cache.load(key, 3) is None
    # save=False (a process that does not write): nothing stored
    other = cache_key("fp3", split, torch.float32)
    cache.get_or_compute(other, 3, compute, meta={}, save=False)
    assert not cache.path(other).exists()
