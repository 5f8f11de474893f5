"""The margin normaliser's modes through its stateful holder (MarginNormalizer) and the loss: the
authors' recurrence, the bias-corrected EMA, frozen/eval, state_dict. Moved out of test_losses.py
unchanged; the pure functions are tested by hand in test_normalizer_state.py.
"""

from __future__ import annotations

import io
import math
import statistics

import pytest
import torch

from alphadpo_cli.losses import MarginNormalizer, compute_loss, make_normalizer
from test_losses import AVG_L, AVG_W, F64, LW, PC, PR, RAVG_L, RAVG_W, _random_batch, batch, close, t


# ==========================================================================================
# Margin normaliser
# ==========================================================================================

STREAM = [[0.1, 0.3, -0.2], [1.0, 2.0], [0.5, -0.5, 0.0, 1.5], [0.25]]


def test_official_mode_reproduces_authors_recurrence():
    norm = MarginNormalizer("official")
    mu = sigma = 0.0
    for gs in STREAM:
        z = norm(t(gs))
        mean = statistics.fmean(gs)
        std = statistics.stdev(gs) if len(gs) > 1 else 0.0
        mu = 0.9 * mu + 0.1 * mean
        sigma = 0.9 * sigma + 0.1 * std
        assert math.isclose(norm.mu, mu, rel_tol=1e-12) and math.isclose(norm.sigma, sigma, rel_tol=1e-12)
        close(z, [(g - mu) / sigma for g in gs])
    assert norm.steps == len(STREAM)
    # and, as in the authors' code, identical g at the first step divide by zero
    assert not torch.isfinite(MarginNormalizer("official")(t([0.0, 0.0]))).all()


def test_ema_mode_bias_corrected_recurrence():
    norm = MarginNormalizer("ema", momentum=0.9)
    a_mu = a_sd = 0.0
    for step, gs in enumerate(STREAM[:3], start=1):
        z = norm(t(gs))
        a_mu = 0.9 * a_mu + 0.1 * statistics.fmean(gs)
        a_sd = 0.9 * a_sd + 0.1 * statistics.stdev(gs)
        mu, sd = a_mu / (1 - 0.9**step), a_sd / (1 - 0.9**step)
        if step == 1:  # first step: exactly the batch's own statistics
            assert math.isclose(mu, statistics.fmean(gs)) and math.isclose(sd, statistics.stdev(gs))
        assert math.isclose(norm.mu, mu, rel_tol=1e-12) and math.isclose(norm.sigma, sd, rel_tol=1e-12)
        close(z, [(g - mu) / sd for g in gs])


def test_no_nan_when_all_g_identical():
    for mode in ("ema", "batch", "none"):
        norm = MarginNormalizer(mode)
        for gs in ([0.7, 0.7, 0.7], [0.0, 0.0], [0.3], [0.7, 0.7, 0.7]):
            z = norm(t(gs))
            assert torch.isfinite(z).all(), (mode, gs, z)
            assert math.isfinite(norm.mu) and math.isfinite(norm.sigma) and norm.sigma > 0
    # step 1 of ema with identical g: z = 0, the loss is SimPO's
    out = compute_loss("alpha_dpo", batch(rc=[PC[i] - 0.4 * LW[i] for i in range(3)], rr=PR))  # g = 0.4 for all
    assert torch.isfinite(out.losses).all()
    close(out.margins, [0.5] * 3, tol=1e-6)


def test_frozen_and_eval_do_not_update():
    norm = MarginNormalizer("ema")
    norm(t([0.0, 1.0, 2.0]))
    mu, sigma, steps = norm.mu, norm.sigma, norm.steps
    with norm.frozen():
        z = norm(t([10.0, 20.0]))
        assert not norm.training
    close(z, [(10.0 - mu) / sigma, (20.0 - mu) / sigma])
    assert (norm.mu, norm.sigma, norm.steps) == (mu, sigma, steps) and norm.training
    norm.eval()
    norm(t([5.0, 6.0]))
    assert (norm.mu, norm.sigma, norm.steps) == (mu, sigma, steps)
    norm.train()
    norm(t([5.0, 6.0]))
    assert norm.steps == steps + 1 and norm.mu != mu
    # same for the official mode, through the loss
    off = MarginNormalizer("official")
    compute_loss("alpha_dpo_official", batch(), normalizer=off)
    with off.frozen():
        compute_loss("alpha_dpo_official", batch(), normalizer=off)
    assert off.steps == 1


def test_state_dict_round_trip_restores_exactly():
    for mode in ("ema", "official", "batch"):
        a = MarginNormalizer(mode)
        for gs in STREAM[:3]:
            a(t(gs))
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        b = MarginNormalizer(mode)
        b.load_state_dict(torch.load(buf))
        assert (b.mu, b.sigma, b.steps) == (a.mu, a.sigma, a.steps)
        nxt = t([0.3, -1.2, 0.9])
        assert torch.equal(a(nxt), b(nxt))
        assert (b.mu, b.sigma, b.steps) == (a.mu, a.sigma, a.steps)
    with pytest.raises(ValueError, match="mode"):
        MarginNormalizer("batch").load_state_dict(MarginNormalizer("ema").state_dict())


def test_normalizer_mode_must_match_params():
    with pytest.raises(ValueError, match="normalization"):
        compute_loss("alpha_dpo", batch(), normalizer=MarginNormalizer("batch"))
    assert make_normalizer("alpha_dpo").mode == "ema"
    assert make_normalizer("alpha_dpo_official").mode == "official"
    assert make_normalizer("alpha_dpo", {"normalization": "batch"}).mode == "batch"
    assert make_normalizer("alpha_dpo_no_norm") is None and make_normalizer("simpo") is None
    with pytest.raises(ValueError, match="mode"):
        MarginNormalizer("zscore")


def test_normalizer_updates_before_normalising_across_loss_calls():
    # step 2 of an EMA normaliser inside the loss uses batch 1 and batch 2
    norm = make_normalizer("alpha_dpo")
    compute_loss("alpha_dpo", _random_batch(seed=1), normalizer=norm)
    out = compute_loss("alpha_dpo", batch(), normalizer=norm)
    assert norm.steps == 2
    g = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    close(out.margins, [0.5 + 0.05 * (x - norm.mu) / norm.sigma for x in g])


def test_normalizer_statistics_are_the_tensors_behind_mu_and_sigma():
    norm = MarginNormalizer("ema")
    norm(t([0.1, 0.4, -0.2]))
    mu, sigma = norm.statistics()
    assert mu.dtype == F64 and sigma.dtype == F64
    assert mu.item() == norm.mu and sigma.item() == norm.sigma
    assert math.isclose(norm.mu, statistics.fmean([0.1, 0.4, -0.2])) and math.isclose(norm.sigma, statistics.stdev([0.1, 0.4, -0.2]))
