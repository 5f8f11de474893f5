"""alpha_dpo_official: evaluation batches update the running statistics, as in the authors' code."""

from __future__ import annotations

import json

import pytest
import torch

from alphadpo_cli.config import resolve_config
from alphadpo_cli.losses import MarginNormalizer, make_params
from alphadpo_cli.train.trainer import train


def _run(tmp_path, prefs_dir, loss, *extra):
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=3",
            "training.save_steps=2", "data.max_samples=16", "data.max_eval_samples=8", "training.eval_steps=1",
            "training.eval_batch_size=3", "training.logging_steps=1", *extra]
    result = train(resolve_config(preset="tiny", overrides=sets, loss=loss))
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-0000002" / "accelerate" / "custom_checkpoint_0.pkl", weights_only=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return result, state, rows


def test_official_mode_updates_on_eval_batches(tmp_path, prefs_dir):
    # tiny preset: 4 pairs per micro-batch, 8 per step -> 2 updates per step from training;
    # 8 held-out pairs in batches of 3 -> 3 updates per evaluation (after steps 1 and 2).
    # (The official EMA divides 0 by 0 at step 1, where the policy equals the reference: its
    # losses are NaN there, as in the authors' code, so only the update counts are compared.)
    _, on, rows_on = _run(tmp_path / "on", prefs_dir, "alpha_dpo_official")
    _, off, rows_off = _run(tmp_path / "off", prefs_dir, "alpha_dpo_official", "loss.params.eval_updates_stats=false")
    assert off["steps"] == 2 * 2
    assert on["steps"] == 2 * 2 + 2 * 3
    assert any("eval/loss" in r for r in rows_on) and not any("eval/loss" in r for r in rows_off)


def test_eval_updates_change_the_trajectory_after_the_first_evaluation(tmp_path, prefs_dir):
    # ema: one update per optimiser step from its whole global batch (2 steps before the checkpoint),
    # plus one per held-out batch of 3 (3 per evaluation, after steps 1 and 2)
    _, on, rows_on = _run(tmp_path / "on", prefs_dir, "alpha_dpo", "loss.params.eval_updates_stats=true")
    _, off, rows_off = _run(tmp_path / "off", prefs_dir, "alpha_dpo")
    assert (on["steps"], off["steps"]) == (2 + 2 * 3, 2)
    assert on["mu_acc"] != off["mu_acc"] and on["sigma_acc"] != off["sigma_acc"]

    def at(rows, step, key):
        return next(r[key] for r in rows if r.get("step") == step and r.get(key) is not None)

    # step 1 trains identically (the first evaluation comes after it) ...
    assert at(rows_on, 1, "loss") == pytest.approx(at(rows_off, 1, "loss"), rel=1e-9)
    assert at(rows_on, 1, "normalizer/mu") == pytest.approx(at(rows_off, 1, "normalizer/mu"), rel=1e-9)
    # ... and so does step 2: step 1 ran at learning rate 0 (the warm-up's first step), so the first
    # evaluation saw the policy equal to the reference, log-ratios of exactly 0, which leave the
    # statistics where they were (on some CPUs the precomputed reference differs from the policy's
    # forward by float noise, and only the noise differed here).
    assert at(rows_on, 1, "learning_rate") == 0.0
    assert at(rows_on, 2, "normalizer/mu") == pytest.approx(at(rows_off, 2, "normalizer/mu"), abs=1e-6)
    # From step 3 on, after an evaluation of a policy that has moved, the statistics (hence the
    # margins) differ by far more than noise.
    mu_on, mu_off = at(rows_on, 3, "normalizer/mu"), at(rows_off, 3, "normalizer/mu")
    assert abs(mu_on - mu_off) > 0.05 * max(abs(mu_on), abs(mu_off)) > 0
    assert at(rows_on, 3, "margin/mean") != pytest.approx(at(rows_off, 3, "margin/mean"), rel=1e-3)


def test_option_defaults_and_range():
    assert make_params("alpha_dpo_official").eval_updates_stats is True
    assert make_params("alpha_dpo").eval_updates_stats is False
    assert make_params("alpha_dpo", {"eval_updates_stats": True}).eval_updates_stats is True  # ema: allowed
    with pytest.raises(ValueError, match="eval_updates_stats needs a running normaliser"):
        make_params("alpha_dpo_batch_norm", {"eval_updates_stats": True})


def test_local_updates_without_gathering():
    norm = MarginNormalizer("official")
    with norm.local():
        assert norm.gather is False
        norm(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert norm.gather is True
    assert norm.mu == pytest.approx(0.1 * 2.0) and norm.sigma == pytest.approx(0.1 * 2 ** 0.5)
