"""The margin normaliser's pure functions (`alphadpo_cli.losses.normalizer_state`), by hand.

Each mode, two updates from given g's: the expected μ, σ are computed here with plain Python
(statistics.fmean / stdev, the recurrences written out), never by the implementation. The state is
a value: an update returns a new one and leaves the old one as it was.
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch

from alphadpo_cli.losses.normalizer_state import (NormalizerConfig, NormalizerState, begin_step, end_step, normalize,
                                                  observe, statistics as stats_of, update)

G1 = [0.2, -0.4, 1.0]
G2 = [0.5, 0.5, -1.5, 2.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def two_updates(mode: str, momentum: float = 0.8, eps: float = 1e-3):
    cfg = NormalizerConfig(mode, momentum, eps)
    s0 = NormalizerState()
    s1 = update(s0, t(G1), cfg)
    s2 = update(s1, t(G2), cfg)
    return s0, s1, s2, cfg


def floats(pair):
    return tuple(float(x) for x in pair)


def test_ema_two_updates_by_hand():
    s0, s1, s2, cfg = two_updates("ema")
    m = 0.8
    a_mu, a_sd = (1 - m) * statistics.fmean(G1), (1 - m) * statistics.stdev(G1)
    assert floats(stats_of(s1, cfg)) == pytest.approx((a_mu / (1 - m), a_sd / (1 - m)), rel=1e-12)
    a_mu, a_sd = m * a_mu + (1 - m) * statistics.fmean(G2), m * a_sd + (1 - m) * statistics.stdev(G2)
    assert floats(stats_of(s2, cfg)) == pytest.approx((a_mu / (1 - m**2), a_sd / (1 - m**2)), rel=1e-12)
    assert (s0.steps, s1.steps, s2.steps) == (0, 1, 2)
    assert floats(stats_of(s0, cfg)) == (0.0, math.inf)  # the old state is untouched: z = 0 before any update


def test_batch_two_updates_by_hand():
    _, s1, s2, cfg = two_updates("batch")
    assert floats(stats_of(s1, cfg)) == pytest.approx((statistics.fmean(G1), statistics.stdev(G1)), rel=1e-12)
    assert floats(stats_of(s2, cfg)) == pytest.approx((statistics.fmean(G2), statistics.stdev(G2)), rel=1e-12)
    same = update(s2, t([3.0, 3.0]), cfg)  # σ floored at eps
    assert floats(stats_of(same, cfg)) == pytest.approx((3.0, 1e-3))


def test_official_two_updates_by_hand():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s0, s1, s2, cfg = two_updates("official")
    m = 0.8
    mu, sd = (1 - m) * statistics.fmean(G1), (1 - m) * statistics.stdev(G1)  # from 0, no bias correction
    assert floats(stats_of(s1, cfg)) == pytest.approx((mu, sd), rel=1e-12)
    mu, sd = m * mu + (1 - m) * statistics.fmean(G2), m * sd + (1 - m) * statistics.stdev(G2)
    assert floats(stats_of(s2, cfg)) == pytest.approx((mu, sd), rel=1e-12)
    assert floats(stats_of(s0, cfg)) == (0.0, 0.0)
    # fewer than 8 values: one warning for the state's lineage, recorded in it
    assert [str(w.message).count("fewer than 8") for w in caught] == [1]
    assert (s0.warned_few, s1.warned_few, s2.warned_few) == (False, True, True)


def test_none_is_the_identity():
    s0, _, s2, cfg = two_updates("none")
    assert s2 is s0 and floats(stats_of(s2, cfg)) == (0.0, 1.0)
    g = torch.tensor([0.25, -3.0], dtype=torch.float32)
    assert torch.equal(normalize(g, *stats_of(s2, cfg)), g)


def test_apply_false_and_the_gather_argument():
    cfg = NormalizerConfig("ema")
    s = NormalizerState()
    calls = []

    def gather(g):  # a stand-in for the all-gather: another process holds 2.0 and 4.0
        calls.append(g.tolist())
        return torch.cat([g, t([2.0, 4.0])])

    assert update(s, t([0.0]), cfg, gather=gather, apply=False) is s and calls == []  # no update, no collective
    s1 = update(s, t([0.0]), cfg, gather=gather)
    assert calls == [[0.0]]
    assert floats(stats_of(s1, cfg)) == pytest.approx((2.0, 2.0), rel=1e-12)  # mean, stdev of 0, 2, 4


def test_a_pooled_step_by_hand():
    # two optimiser steps of two micro-batches: each normalised with the previous step's statistics
    cfg = NormalizerConfig("ema", momentum=0.9)
    s = begin_step(NormalizerState())
    zs = []
    for g in ([0.1, 0.5], [-0.3]):
        s = observe(s, t(g), cfg)
        zs.append(normalize(t(g), *stats_of(s, cfg)).tolist())
    assert zs == [[0.0, 0.0], [0.0]] and len(s.pending) == 2
    s, used = end_step(s, cfg)
    flat = [0.1, 0.5, -0.3]
    assert used == 3 and not s.in_step and s.pending == ()
    mu, sd = statistics.fmean(flat), statistics.stdev(flat)
    s = observe(begin_step(s), t([1.0, 2.0]), cfg)
    assert normalize(t([1.0, 2.0]), *stats_of(s, cfg)).tolist() == pytest.approx([(1 - mu) / sd, (2 - mu) / sd])
    skipped, used = end_step(s, cfg, apply=False)  # a skipped step: no update
    assert used == 0 and skipped.steps == 1
    with pytest.raises(RuntimeError, match="begin_step"):
        end_step(skipped, cfg)


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown normalizer mode 'zscore'"):
        NormalizerConfig("zscore")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        NormalizerConfig("ema", momentum=1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        NormalizerConfig("ema", eps=-1.0)
