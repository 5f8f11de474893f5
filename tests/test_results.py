"""The one results format of compare.json and rounds.json (`alphadpo_cli.results`): estimates by
hand, both commands' sections built from their records, read back and shown by one table."""

from __future__ import annotations

import json
import math

import pytest

from alphadpo_cli import results
from alphadpo_cli.compare.summary import results_section as compare_section
from alphadpo_cli.iterate.report import results_section as iterate_section, write_rounds_json


def test_an_estimate_by_hand():
    e = results.estimate(0.5, 0.1, 5, unit="prompts")
    # t(0.975, 4) = 2.776445...: 0.5 ± 0.2776
    assert e["ci95"] == pytest.approx([0.5 - 0.27764, 0.5 + 0.27764], abs=1e-5)
    assert e["sd"] == pytest.approx(0.1 * math.sqrt(5)) and e["unit"] == "prompts" and e["n"] == 5
    assert results.estimate(0.7)["ci95"] is None and results.estimate(None) is None
    assert results.estimate(0.5, 0.1, 1)["ci95"] is None  # one unit: no interval


def _iterate_record():
    judge = lambda r, se, w0, wp: {"n": 4, "reward": r, "reward_se": se, "length_tokens": 12.5,  # noqa: E731
                                   "extras": {"constraints_satisfied": 0.25}, "win_vs_initial": w0,
                                   "win_vs_initial_se": 0.1 if w0 is not None else None, "win_vs_previous": wp,
                                   "win_vs_previous_se": None}
    return {"initial_model": "base", "initial": judge(0.2, 0.05, None, None),
            "rounds": [{"round": 1, "model": "r1", "judge": judge(0.4, 0.05, 0.75, 0.75)},
                       {"round": 2, "model": "r2", "judge": None}],  # sampled, not judged yet
            "offline": {"round": "offline", "model": "off", "judge": judge(0.3, 0.04, 0.6, None)}}


def _compare_parts():
    iv = lambda m, se, n=3: {"n": n, "mean": m, "sd": se * math.sqrt(n), "se": se, "ci95": [m - 0.1, m + 0.1]}  # noqa: E731
    methods = [{"method": "alpha_dpo", "setting": "alpha=0.1", "runs": {"a/seed-1": "/r/a1", "a/seed-2": "/r/a2"},
                "metrics": {"accuracy": iv(0.7, 0.01), "mean_reward": iv(0.5, 0.02), "win_rate": iv(0.8, 0.03),
                            "constraints_satisfied": iv(0.45, 0.02), "length_tokens": iv(11.0, 1.0),
                            "train_seconds": iv(100.0, 3.0)}}]
    base = {"accuracy": 0.66, "mean_reward": 0.27, "reward_se": 0.04, "n_prompts": 71, "constraints_satisfied": 0.23,
            "length_tokens": 56.6}
    paired = [{"method": "alpha_dpo", "baseline": "simpo", "metric": "reward", "mean": 0.01, "ci95_pairs": [-0.02, 0.04]}]
    return methods, base, paired


def test_iterate_rows_are_the_judged_models_with_spreads_over_prompts(tmp_path):
    sec = iterate_section(_iterate_record())
    assert [(r["name"], r["kind"]) for r in sec["rows"]] == [("π0", "base"), ("round 1", "round"), ("offline", "offline")]
    r1 = sec["rows"][1]["metrics"]
    assert r1["mean_reward"]["mean"] == 0.4 and r1["mean_reward"]["unit"] == "prompts" and r1["mean_reward"]["n"] == 4
    assert r1["win_rate"]["mean"] == 0.75 and r1["constraints_satisfied"]["mean"] == 0.25
    assert "win_rate" not in sec["rows"][0]["metrics"]  # π0 against itself: none
    write_rounds_json(tmp_path / "rounds.json", _iterate_record())
    assert results.read_results(tmp_path / "rounds.json") == json.loads(json.dumps(sec))


def test_compare_rows_are_the_base_and_the_methods_with_spreads_over_seeds(tmp_path):
    methods, base, paired = _compare_parts()
    sec = compare_section(methods, base, paired, "base-model")
    assert [(r["name"], r["kind"]) for r in sec["rows"]] == [("base model", "base"), ("alpha_dpo", "method")]
    m = sec["rows"][1]["metrics"]
    assert m["mean_reward"]["unit"] == "seeds" and m["mean_reward"]["se"] == 0.02 and "train_seconds" not in m
    assert sec["rows"][0]["metrics"]["mean_reward"]["unit"] == "prompts"
    assert sec["rows"][1]["model"] == ["/r/a1", "/r/a2"] and sec["paired"][0]["metric"] == "mean_reward"
    (tmp_path / "compare.json").write_text(json.dumps({"methods": methods, "results": sec}))
    assert results.read_results(tmp_path / "compare.json")["rows"] == json.loads(json.dumps(sec["rows"]))


def test_one_table_shows_both_with_the_same_columns_for_the_same_metrics():
    methods, base, paired = _compare_parts()
    h_cmp, rows_cmp = results.table_cells(compare_section(methods, base, paired, "base-model"))
    h_it, rows_it = results.table_cells(iterate_section(_iterate_record()))
    assert h_cmp == ["model", "setting", "n", "acc (test)", "reward", "win vs base", "constraints", "tokens"]
    assert h_it == ["model", "setting", "n", "reward", "win vs base", "win vs prev", "constraints", "tokens"]
    assert rows_cmp[0] == ["base model", "", "71 prompts", "0.660", "0.270 ± 0.040", "-", "23.0%", "56.6"]
    assert rows_cmp[1] == ["alpha_dpo", "alpha=0.1", "3 seeds", "0.700 ± 0.010", "0.500 ± 0.020", "80.0% ± 3.0",
                           "45.0% ± 2.0", "11.0 ± 1.0"]
    assert rows_it[1] == ["round 1", "", "4 prompts", "0.400 ± 0.050", "75.0% ± 10.0", "75.0%", "25.0%", "12.5"]
    from rich.console import Console

    console = Console(record=True, width=160, file=open("/dev/null", "w"))
    console.print(results.results_table(iterate_section(_iterate_record()), title="rounds"))
    text = console.export_text()
    assert "round 1" in text and "win rates against π0" in text


def test_a_file_without_a_results_section_is_refused_by_name(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"methods": []}))
    with pytest.raises(ValueError, match=r"x\.json: no results section"):
        results.read_results(tmp_path / "x.json")
    with pytest.raises(ValueError, match="kind 'seed'"):
        results.row("a", "seed", {})
