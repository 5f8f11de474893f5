"""`alphadpo margins` on the tiny model and the fixture pairs.

One real tiny training run (4 steps, ~15 s) is shared by the module. While it trains, every call
the trainer makes to the loss library is recorded, so the margins computed here can be checked
against the margins the library produced inside training for the very same pairs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alphadpo_cli.losses import PreferenceLogps, compute_loss, make_params
from alphadpo_cli.margins import (
    PolicySpec,
    RunStats,
    compute_series,
    correlation,
    describe,
    inspect_margins,
    load_run,
    parse_labelled,
    read_png_series,
    render_histogram,
)

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny α-DPO run on the fixture pairs, with every training-time loss call recorded."""
    from rich.console import Console

    import alphadpo_cli.train.trainer as trainer_mod
    from alphadpo_cli.config import resolve_config

    root = tmp_path_factory.mktemp("margins-run")
    cache, out = root / "cache", root / "run"
    calls = []
    real = trainer_mod.compute_loss

    def spy(name, inputs, params=None, normalizer=None):
        snapshot = {k: (None if v is None else v.detach().clone()) for k, v in vars(inputs).items()}
        training = normalizer is not None and normalizer.training
        result = real(name, inputs, params, normalizer)
        calls.append({"training": training, "inputs": snapshot, "margins": result.margins.detach().clone(),
                      "losses": result.losses.detach().clone(),
                      "chosen_rewards": result.chosen_rewards.clone(), "rejected_rewards": result.rejected_rewards.clone()})
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALPHADPO_CACHE", str(cache))
        mp.setattr(trainer_mod, "compute_loss", spy)
        cfg = resolve_config(preset="tiny", overrides=[f"data.dataset={PREFS}", f"training.output_dir={out}"])
        trainer_mod.train(cfg, overwrite=True, console=Console(file=io.StringIO()))
    return SimpleNamespace(dir=out, cache=cache, calls=calls, cfg=cfg)


@pytest.fixture(autouse=True)
def _run_cache(request, monkeypatch):
    """Tests that use the run see its caches (the reference log-probs training wrote)."""
    if "trained" in request.fixturenames:
        monkeypatch.setenv("ALPHADPO_CACHE", str(request.getfixturevalue("trained").cache))


@pytest.fixture(scope="module")
def report(trained):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALPHADPO_CACHE", str(trained.cache))
        return inspect_margins(str(PREFS), run_dir=trained.dir, alphas=[0.0, 0.05, 0.2])


def _cat(calls, key):
    return torch.cat([c[key] for c in calls])


# ---------------------------------------------------------------------------------------------
# the margins are the library's, as computed inside training


def test_margins_equal_the_ones_training_computed(trained):
    calls = [c for c in trained.calls if c["training"]]
    assert len(calls) == 8  # 4 optimiser steps x 2 micro-batches of 4 pairs
    ins = {k: torch.cat([c["inputs"][k] for c in calls]) for k in (
        "policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths",
        "ref_chosen_logps", "ref_rejected_logps")}
    scores = PreferenceLogps(ins["policy_chosen_logps"], ins["policy_rejected_logps"], ins["chosen_lengths"],
                        ins["rejected_lengths"], ins["ref_chosen_logps"], ins["ref_rejected_logps"])
    params = make_params(trained.cfg.loss.name, trained.cfg.loss.params)
    # The trainer's normaliser (EMA) replayed over the same optimiser steps (8 pairs: its statistics
    # are updated once per step), in the trainer's precision.
    s = compute_series(scores, trained.cfg.loss.name, params, norm="ema", norm_batch=8, dtype=torch.float32)

    expected = _cat(calls, "margins").double().numpy()
    assert expected.std() > 0  # the margin really adapts (after step 1)
    np.testing.assert_array_equal(s.margin, expected)
    # ...and only with the trainer's grouping: other groups give the EMA other statistics.
    regrouped = compute_series(scores, trained.cfg.loss.name, params, norm="ema", norm_batch=4, dtype=torch.float32)
    assert not np.allclose(regrouped.margin, expected)
    np.testing.assert_array_equal(s.loss, _cat(calls, "losses").double().numpy())
    np.testing.assert_array_equal(s.reward_chosen, _cat(calls, "chosen_rewards").double().numpy())
    np.testing.assert_array_equal(s.reward_rejected, _cat(calls, "rejected_rewards").double().numpy())
    # m = γ/β + α·z, and the final normaliser state is the one training logged last.
    np.testing.assert_allclose(s.margin, params.gamma_beta_ratio + params.alpha * s.z, atol=1e-6)
    last = load_run(trained.dir).normalizer_stats
    assert s.mu == pytest.approx(last.mu, rel=1e-6, abs=1e-12)
    assert s.sigma == pytest.approx(last.sigma, rel=1e-6)


def test_inspect_scores_a_batch_like_the_trainer(trained):
    """End to end (model scoring included) against the library on a hand-built micro-batch."""
    from alphadpo_cli.logps.layouts import PairCollator
    from alphadpo_cli.data import TokenizeSettings, tokenize_split
    from alphadpo_cli.logps.sequence import SequenceLogps
    from alphadpo_cli.models.loading import load_for_inference

    rep = inspect_margins(str(PREFS), policies=[PolicySpec(str(trained.dir), "adapter")], split="train",
                          norm="batch", norm_batch=4)
    assert rep.reference.startswith("cache hit")  # the reference log-probs training cached
    assert len(rep.pairs) == 32 and rep.primary.norm == "batch"

    net, tok = load_for_inference("tiny-random", str(trained.dir))
    d = trained.cfg.data
    split = tokenize_split(str(PREFS), "train", tok, TokenizeSettings(d.max_length, d.max_prompt_length, d.truncation),
                           d.max_samples)
    batch = PairCollator(tok.pad_token_id)([split.dataset[i] for i in range(4, 8)])
    scorer = SequenceLogps(net)
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        sums, counts = scorer(*args)
        with net.disable_adapter():
            ref, _ = scorer(*args)
    inputs = PreferenceLogps(sums[:4], sums[4:], counts[:4], counts[4:], ref[:4], ref[4:])
    params = make_params("alpha_dpo", {**trained.cfg.loss.params, "normalization": "batch"})
    out = compute_loss("alpha_dpo", inputs, params)

    s = rep.primary
    np.testing.assert_allclose(s.delta_theta[4:8], (inputs.policy_chosen_avg - inputs.policy_rejected_avg).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(s.g[4:8], s.delta_theta[4:8] - s.delta_ref[4:8], atol=1e-12)
    np.testing.assert_allclose(s.margin[4:8], out.margins.double().numpy(), atol=1e-4)
    np.testing.assert_allclose(s.reward_diff[4:8], (out.chosen_rewards - out.rejected_rewards).double().numpy(),
                               atol=1e-4)
    np.testing.assert_array_equal(s.correct[4:8], (out.chosen_rewards > out.rejected_rewards).numpy())


def test_no_cache_scores_the_reference_again(trained, report):
    """--no-cache: the reference is computed (adapter disabled) although training cached it, and
    with saving off the cache is left as it was."""
    from alphadpo_cli.logps.cache import ReferenceCache

    before = sorted(p.name for p in ReferenceCache().root.iterdir())
    rep = inspect_margins(str(PREFS), run_dir=trained.dir, use_reference_cache=False, save_reference_cache=False)
    assert rep.reference == "computed (base model, adapter disabled)"
    assert sorted(p.name for p in ReferenceCache().root.iterdir()) == before
    for field in ("ref_chosen_logps", "ref_rejected_logps", "policy_chosen_logps"):
        np.testing.assert_allclose(getattr(rep.policies[0].scores, field), getattr(report.policies[0].scores, field),
                                   rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# normalisations and α / γ sweeps, on the scores of the run's held-out pairs


def test_report_series_per_alpha(report, trained):
    assert [s.label for s in report.series] == ["α=0", "α=0.05", "α=0.2"]
    assert report.primary.alpha == 0.05  # the run's configured α
    assert report.split == "test" and len(report.pairs) == 8
    assert report.reference.startswith("cache hit")
    gbr = trained.cfg.loss.params["gamma_beta_ratio"]
    z = report.series[1].z
    for s in report.series:
        assert s.norm == "dataset"
        np.testing.assert_allclose(s.z, z)  # z does not depend on α
        np.testing.assert_allclose(s.margin, gbr + s.alpha * s.z, atol=1e-9)
    assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std(ddof=1) == pytest.approx(1.0, rel=1e-6)
    # α = 0 is SimPO: the same per-pair loss as the library's SimPO with the same β and γ/β.
    sc = report.policies[0].scores
    simpo = compute_loss("simpo", PreferenceLogps(sc.policy_chosen_logps, sc.policy_rejected_logps, sc.chosen_lengths, sc.rejected_lengths),
                         {"beta": 2.5, "gamma_beta_ratio": gbr})
    np.testing.assert_allclose(report.series[0].loss, simpo.losses.numpy(), rtol=1e-12)


def test_normalisation_modes(report, trained):
    sc = report.policies[0].scores
    params = report.primary.params
    none = compute_series(sc, "alpha_dpo", params, norm="none")
    np.testing.assert_allclose(none.z, none.g)
    stats = load_run(trained.dir).normalizer_stats
    run = compute_series(sc, "alpha_dpo", params, norm="run", run_stats=stats)
    np.testing.assert_allclose(run.z, (run.g - stats.mu) / stats.sigma, rtol=1e-9)
    assert (run.mu, run.sigma) == pytest.approx((stats.mu, stats.sigma))
    batch = compute_series(sc, "alpha_dpo", params, norm="batch", norm_batch=4)
    for sl in (slice(0, 4), slice(4, 8)):
        assert batch.z[sl].mean() == pytest.approx(0.0, abs=1e-9)
    ablation = compute_series(sc, "alpha_dpo_no_norm", None)  # auto: the ablation's own "none"
    assert ablation.norm == "none"
    from alphadpo_cli.config import ConfigError

    with pytest.raises(ConfigError, match="--norm run"):
        compute_series(sc, "alpha_dpo", params, norm="run")


def test_simpo_gamma_sweep(report):
    sc = report.policies[0].scores
    series = [compute_series(sc, "simpo", {"beta": 2.5}, overrides={"gamma_beta_ratio": g}, label=f"γ/β={g}")
              for g in (0.3, 0.8)]
    assert [s.norm for s in series] == ["n/a", "n/a"] and series[0].z is None
    assert np.all(series[0].margin == 0.3) and np.all(series[1].margin == 0.8)
    np.testing.assert_allclose(series[0].reward_diff, series[1].reward_diff)  # SimPO's reward ignores γ
    assert series[1].loss.mean() > series[0].loss.mean()


def test_records_and_summary(report, tmp_path):
    recs = report.records()
    assert len(recs) == 3 * 8
    r = recs[8]  # α=0.05, first pair
    assert r["series"] == "α=0.05" and r["chosen"] and r["prompt"]
    assert r["margin"] == pytest.approx(r["gamma_beta_ratio"] + r["alpha"] * r["z"])
    assert r["g"] == pytest.approx(r["delta_theta"] - r["delta_ref"])
    assert r["reward_diff"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"])
    assert r["correct"] == (r["reward_diff"] > 0)
    assert r["policy_chosen_avg"] == pytest.approx(r["policy_chosen_sum"] / r["chosen_len"])
    summary = json.loads(report.write_summary(tmp_path / "s.json").read_text())
    s = summary["series"][1]
    assert s["margin"]["q50"] is not None and s["accuracy"] == pytest.approx(float(report.series[1].correct.mean()))
    top, bottom = report.extremes(3)
    m = report.primary.margin
    assert m[top[0]] == m.max() and m[bottom[0]] == m.min()


def test_cli_module_is_light():
    import subprocess
    import sys

    from alphadpo_cli import margins
    from alphadpo_cli.cli import margins as margins_cli

    assert margins_cli.NORM_MODES is margins.NORM_MODES  # one constant, the API's (options.py, no torch)
    code = "import sys, alphadpo_cli.cli.margins; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    code = ("import sys, alphadpo_cli.cli.margins; "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'alphadpo_cli.margins.series') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_statistics_helpers():
    d = describe(np.array([1.0, 2.0, 3.0, 4.0, np.nan]))
    assert d["mean"] == 2.5 and d["q50"] == 2.5 and d["min"] == 1.0 and d["max"] == 4.0
    assert correlation(np.arange(5.0), 2 * np.arange(5.0)) == pytest.approx(1.0)
    assert correlation(np.ones(5), np.arange(5.0)) is None  # a constant margin (α = 0)
    assert parse_labelled("a0.2=runs/x") == ("a0.2", "runs/x")
    assert parse_labelled(str(PREFS)) == (None, str(PREFS))


def test_terminal_histogram():
    from rich.console import Console

    table = render_histogram(np.array([0.0, 0.1, 0.1, 0.9, 1.0]), bins=5, width=10, title="m")
    console = Console(file=io.StringIO(), width=80)
    console.print(table)
    text = console.file.getvalue()
    counts = [int(line.split()[-1]) for line in text.splitlines()[2:] if line.strip()]
    assert sum(counts) == 5 and len(counts) == 5
    assert "█" * 10 in text  # the fullest bin spans the whole width


# ---------------------------------------------------------------------------------------------
# the command


def _cli(*args):
    from alphadpo_cli.cli import main

    return CliRunner().invoke(main, ["margins", *args], catch_exceptions=False)


def _png(path: Path) -> list[str]:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    return read_png_series(path)


def test_cli_from_run_with_data(trained, tmp_path):
    out = tmp_path / "out"
    res = _cli("--from-run", str(trained.dir), "--data", str(PREFS), "--alpha", "0,0.05,0.2", "-o", str(out),
               "--format", "csv", "--top-k", "2")
    assert res.exit_code == 0, res.output
    for text in ("per-pair quantities", "by series", "top 2 pairs", "bottom 2 pairs", "margin m", "normalizer/sigma",
                 "cache hit", "+ "):
        assert text in res.output
    import csv

    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(rows) == 24 and {"g", "z", "margin", "reward_diff", "correct", "prompt"} <= set(rows[0])
    assert _png(out / "margins-reward.png") == ["α=0", "α=0.05", "α=0.2"]
    assert _png(out / "margins-margin.png") == ["α=0", "α=0.05", "α=0.2"]
    assert _png(out / "margins-loglik.png") == ["policy", "reference"]
    assert _png(out / "margins-run.png") == ["margin/mean", "margin/std", "margin/min", "margin/max",
                                             "normalizer/mu", "normalizer/sigma"]
    assert json.loads((out / "summary.json").read_text())["pairs"] == 8


def test_cli_from_run_only_plots_training_curves(trained, tmp_path):
    res = _cli("--from-run", str(trained.dir), "-o", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "margin/mean" in res.output and "normalizer/mu" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["margins-run.png"]


def test_cli_several_policies_one_curve_each(trained, tmp_path):
    res = _cli("--adapter", f"first={trained.dir}", "--adapter", str(trained.dir), "--data", str(PREFS),
               "--split", "test", "-o", str(tmp_path), "--format", "jsonl", "--top-k", "0")
    assert res.exit_code == 0, res.output
    # unlabelled: named after its directory ("run"), since both runs have the same α
    assert _png(tmp_path / "margins-reward.png") == ["first", "run"]
    assert _png(tmp_path / "margins-loglik.png") == ["first", "run", "reference"]
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["series"] == "first"


def test_cli_simpo_gamma_curves(trained, tmp_path):
    res = _cli("--from-run", str(trained.dir), "--data", str(PREFS), "--loss", "simpo", "--gamma", "0.3,0.8",
               "-o", str(tmp_path), "--top-k", "1")
    assert res.exit_code == 0, res.output
    assert _png(tmp_path / "margins-reward.png") == ["γ/β=0.3", "γ/β=0.8"]
    assert "reward difference (the margin is constant)" in res.output


@pytest.mark.parametrize("args, message", [
    ((), "give --data"),
    (("--data", str(PREFS), "--model", "tiny-random", "--loss", "dpo", "--alpha", "0.1"), "has no alpha"),
    (("--data", str(PREFS), "--model", "tiny-random", "--alpha", "x"), "not a number"),
])
def test_cli_errors(args, message):
    res = _cli(*args)
    assert res.exit_code == 2
    assert message in res.output


def test_cli_several_policies_and_alphas_refused(trained):
    res = _cli("--adapter", str(trained.dir), "--adapter", str(trained.dir), "--data", str(PREFS),
               "--alpha", "0,0.1")
    assert res.exit_code == 2 and "several policies" in res.output


def test_base_model_alone_has_zero_discrepancy(tmp_path):
    rep = inspect_margins(str(PREFS), model="tiny-random", split="test", norm="none")
    s = rep.primary
    assert rep.reference.startswith("computed") and rep.policies[0].label == "base model"
    np.testing.assert_allclose(s.g, 0.0, atol=1e-6)  # policy = reference
    assert isinstance(RunStats(0.0, 1.0, 0), RunStats)


def test_kde_is_a_gaussian_density_with_silvermans_robust_bandwidth():
    from alphadpo_cli.margins.plots import _kde

    x = np.array([0.1, 0.4, 0.35, -0.2, 1.5, 0.0, 0.3, 0.25])
    grid = np.linspace(-1.0, 2.5, 71)
    # by hand: h = 0.9·min(std, IQR/1.349)·n^(−1/5), density = mean of N(grid; x_i, h²)
    std = float(np.std(x, ddof=1))
    q75, q25 = np.percentile(x, [75, 25])
    h = 0.9 * min(std, (q75 - q25) / 1.349) * len(x) ** -0.2
    want = [sum(np.exp(-0.5 * ((g - xi) / h) ** 2) for xi in x) / (len(x) * h * np.sqrt(2 * np.pi)) for g in grid]
    np.testing.assert_allclose(_kde(x, grid), want, rtol=1e-10, atol=1e-14)
    fine = np.linspace(-5.0, 7.0, 4001)
    assert np.trapezoid(_kde(x, fine), fine) == pytest.approx(1.0, rel=1e-6)  # a density
    assert _kde(np.array([0.3, 0.3, 0.3]), grid) is None  # constant (e.g. SimPO's margin): no density
    assert _kde(np.array([0.3, np.nan]), grid) is None  # fewer than two finite values
