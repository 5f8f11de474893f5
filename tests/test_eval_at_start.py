"""The held-out report before training, and the layout every held-out report is scored in.

* Where the policy starts as the reference (LoRA with PEFT's zero `B`, no `model.init_adapter`, no
  separate `model.reference`), the report before training is the reference's precomputed held-out
  scores: no pass over the held-out split, the same accuracy as scoring the policy (the oracle: the
  same run with the reuse switched off), and reference-relative rewards exactly 0.
* Anything else that makes the policy differ from the reference at step 0 scores it.
* The held-out reports score as the training forward does (packed when the run packs); packed and
  padded give the same report (another layout as the oracle).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alphadpo_cli.config import resolve_config
from alphadpo_cli.logps import scoring
from alphadpo_cli.models.loading import load_models
from alphadpo_cli.train import evaluate as evaluate_mod
from alphadpo_cli.train.trainer import Trainer


def tiny_config(tmp_path, prefs_dir, *extra, loss=None):
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=1",
            "data.max_samples=8", "data.max_eval_samples=8", "data.max_length=160", "data.max_prompt_length=64",
            *extra]
    return resolve_config(preset="tiny", overrides=sets, loss=loss)


@pytest.fixture
def held_out_passes(monkeypatch):
    """How many times the trainer's held-out report scored the split with the policy."""
    calls = []
    real = evaluate_mod.score_with_reference

    def counting(*a, **kw):
        calls.append(kw.get("layout"))
        return real(*a, **kw)

    monkeypatch.setattr(evaluate_mod, "score_with_reference", counting)
    return calls


def test_lora_report_before_training_is_the_precomputed_reference_and_equals_scoring_the_policy(
        tmp_path, prefs_dir, held_out_passes, monkeypatch):
    reused = Trainer(tiny_config(tmp_path / "a", prefs_dir)).run()
    assert len(held_out_passes) == 1  # after training only: before it, nothing was scored again
    layout = held_out_passes[-1]  # scored as the training forward: packed, prompts shared
    assert layout.packed and layout.prefix_sharing and layout.longest_first
    before = reused.eval_before
    assert before["accuracy_ref"] == 0.5 and before["ref_reward_margin"] == 0.0 and before["logratio_per_token"] == 0.0

    # the oracle: the same run with the policy scored before training, in the other layout (padded)
    monkeypatch.setattr(evaluate_mod, "starts_at_reference", lambda cfg, models: False)
    scored = Trainer(tiny_config(tmp_path / "b", prefs_dir, "training.packing=false")).run()
    assert len(held_out_passes) == 3 and not held_out_passes[-1].packed and held_out_passes[-1].batch_size == 8
    oracle = scored.eval_before
    assert before["pairs"] == oracle["pairs"] == 8
    assert before["accuracy"] == oracle["accuracy"]
    for key in ("reward_margin", "logps_chosen", "logps_rejected", "length_chosen", "length_rejected"):
        assert before[key] == pytest.approx(oracle[key], rel=1e-5, abs=1e-6), key
    assert abs(oracle["ref_reward_margin"]) < 1e-4  # scoring the policy: zero up to rounding
    # after training, packed and padded reports of the same steps agree (after one small step the
    # reference-relative margins are near 0, so their signs, and accuracy_ref, are rounding: not compared)
    a, b = reused.eval_after, scored.eval_after
    assert a["accuracy"] == b["accuracy"]
    for key in ("reward_margin", "logps_chosen", "logps_rejected"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert a["ref_reward_margin"] == pytest.approx(b["ref_reward_margin"], abs=1e-4)
    assert reused.losses == pytest.approx(scored.losses, rel=1e-5)  # training itself is untouched


def test_simpo_has_no_precomputed_reference_and_scores_before_training(tmp_path, prefs_dir, held_out_passes):
    res = Trainer(tiny_config(tmp_path, prefs_dir, loss="simpo")).run()
    assert len(held_out_passes) == 2 and res.eval_before["pairs"] == 8


def test_starts_at_reference_only_when_the_adapters_add_exact_zeros(tmp_path, prefs_dir):
    cfg = tiny_config(tmp_path, prefs_dir)
    models = load_models(cfg.model, cfg.lora, need_reference_model=False)
    assert evaluate_mod.starts_at_reference(cfg, models)
    # another starting point than the reference (model.init_adapter changes the policy's identity)
    assert not evaluate_mod.starts_at_reference(cfg, dataclasses.replace(models, policy_fingerprint="another start"))
    # a separate reference model
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, reference="some/other-model"))
    assert not evaluate_mod.starts_at_reference(other, models)
    # one B entry away from zero: the adapters change the output
    b = next(p for n, p in models.policy.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        b[0, 0] = 1e-3
    assert not evaluate_mod.starts_at_reference(cfg, models)


def test_nonzero_adapters_at_start_are_scored_before_training(tmp_path, prefs_dir, held_out_passes, monkeypatch):
    real_load = evaluate_mod.starts_at_reference

    def perturbed(cfg, models):
        with torch.no_grad():
            for n, p in models.policy.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01)
        return real_load(cfg, models)

    monkeypatch.setattr(evaluate_mod, "starts_at_reference", perturbed)
    res = Trainer(tiny_config(tmp_path, prefs_dir)).run()
    assert len(held_out_passes) == 2
    assert res.eval_before["ref_reward_margin"] != 0.0


def test_scoring_layout_of_training_follows_the_config(tmp_path, prefs_dir):
    t = tiny_config(tmp_path, prefs_dir, "training.token_budget=512", "training.prefix_sharing=false",
                    "training.logprob_chunk_size=32").training
    lay = scoring.ScoringLayout.of_training(t, 5)
    assert lay == scoring.ScoringLayout(packed=True, token_budget=512, prefix_sharing=False, batch_size=5,
                                        longest_first=True, chunk_size=32)
    assert scoring.ScoringLayout.of_training(dataclasses.replace(t, packing=False, logprob_chunk_size=0), 3) == \
        scoring.ScoringLayout(packed=False, token_budget=512, prefix_sharing=False, batch_size=3, longest_first=True)
