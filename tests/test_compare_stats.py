"""`alphadpo compare`'s intervals, by hand on small numbers (alphadpo_cli/compare/stats.py defines them)."""

from __future__ import annotations

import math

import pytest

from alphadpo_cli.compare.stats import interval, paired_difference


def test_the_interval_over_seeds_by_hand():
    iv = interval([0.70, 0.74, 0.72])
    # mean 0.72; deviations -0.02, 0.02, 0 -> sd = sqrt(0.0008 / 2) = 0.02; SE = 0.02 / sqrt(3)
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(0.72)
    assert iv["sd"] == pytest.approx(0.02) and iv["se"] == pytest.approx(0.02 / math.sqrt(3))
    t2 = 4.302652729911275  # t(0.975, 2 degrees of freedom), from a table
    assert iv["ci95"] == pytest.approx([0.72 - t2 * 0.02 / math.sqrt(3), 0.72 + t2 * 0.02 / math.sqrt(3)])


def test_one_seed_has_no_interval_and_nones_are_left_out():
    assert interval([0.5, None]) == {"n": 1, "mean": 0.5, "sd": None, "se": None, "ci95": None}
    assert interval([None]) is None and interval([]) is None


def test_the_paired_difference_by_hand():
    # two seeds, three prompts; method − baseline per (prompt, seed):
    #   seed 1: 1.0 − 0.5 = 0.5, 0.0 − 0.0 = 0.0, 1.0 − 0.0 = 1.0   (mean 0.5)
    #   seed 2: 0.5 − 0.5 = 0.0, 1.0 − 0.0 = 1.0, 0.5 − 1.0 = −0.5  (mean 1/6)
    method = {"1": {"a": 1.0, "b": 0.0, "c": 1.0}, "2": {"a": 0.5, "b": 1.0, "c": 0.5}}
    baseline = {"1": {"a": 0.5, "b": 0.0, "c": 0.0}, "2": {"a": 0.5, "b": 0.0, "c": 1.0}}
    d = paired_difference(method, baseline)
    diffs = [0.5, 0.0, 1.0, 0.0, 1.0, -0.5]
    mean = sum(diffs) / 6  # = 1/3 = the mean over seeds of (0.5, 1/6)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5)
    t5 = 2.570581835636314  # t(0.975, 5)
    assert d["mean"] == pytest.approx(1 / 3) and d["n_pairs"] == 6 and d["n_seeds"] == 2 and d["n_prompts"] == 3
    assert d["se_pairs"] == pytest.approx(sd / math.sqrt(6))
    assert d["ci95_pairs"] == pytest.approx([mean - t5 * sd / math.sqrt(6), mean + t5 * sd / math.sqrt(6)])
    # the seed as the unit: per-seed means 0.5 and 1/6, sd = |0.5 − 1/6| / sqrt(2), SE = sd / sqrt(2) = 1/6
    assert d["per_seed"] == pytest.approx([0.5, 1 / 6]) and d["se_seeds"] == pytest.approx(1 / 6)
    t1 = 12.706204736174698  # t(0.975, 1)
    assert d["ci95_seeds"] == pytest.approx([1 / 3 - t1 / 6, 1 / 3 + t1 / 6])


def test_unscored_answers_and_unpaired_seeds_are_left_out():
    method = {"1": {"a": 1.0, "b": None}, "2": {"a": 1.0}, "3": {"a": 0.0}}
    baseline = {"1": {"a": 0.0, "b": 1.0}, "2": {"a": 0.5}}  # seed 3 has no baseline run
    d = paired_difference(method, baseline)
    assert d["n_pairs"] == 2 and d["n_seeds"] == 2 and d["mean"] == pytest.approx(0.75)
    assert paired_difference({"1": {"a": None}}, {"1": {"a": 1.0}}) is None
