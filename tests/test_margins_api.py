"""The seams of `alphadpo_cli.margins`: the options checked before any model loads, the terminal
rendering of a report built from hand-made scores (no model), the lazy package exports, and the
missing-split fallback of `inspect_margins` (by exception type, on the tiny base model)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from alphadpo_cli.config import ConfigError
from alphadpo_cli.data import MissingSplitError
from alphadpo_cli.losses import PreferenceLogps
from alphadpo_cli.margins import (
    NORM_MODES,
    InspectOptions,
    MarginReport,
    PolicyScores,
    PolicySpec,
    RunInfo,
    compute_series,
    inspect_margins,
    print_report,
)
from alphadpo_cli.margins.terminal import run_table

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"


# ---------------------------------------------------------------------------------------------
# options


def test_options_normalise_their_fields():
    o = InspectOptions("prefs/", policies=[PolicySpec("a")], overrides=["loss.params.beta=3"], alphas=[0, 0.1])
    assert o.policies == (PolicySpec("a"),) and o.overrides == ("loss.params.beta=3",)
    assert o.alphas == [0, 0.1] and o.gammas is None and o.sweeps and not o.several_policies
    assert InspectOptions("prefs/", alphas=[]).alphas is None  # empty: no sweep, the configured α
    assert not InspectOptions("prefs/", alphas=[0.1], gammas=[0.5]).sweeps  # one value each: no curves


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give --data"),
    ({"data": "prefs/", "norm": "zscore"}, "unknown normalisation 'zscore'"),
    ({"data": "prefs/", "policies": [PolicySpec("a"), PolicySpec("b")], "alphas": [0, 0.1]}, "several policies"),
    ({"data": "prefs/", "policies": [PolicySpec("a"), PolicySpec("b")], "gammas": [0.3, 0.8]}, "several policies"),
])
def test_options_refuse_before_any_model_loads(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        InspectOptions(**kwargs)


def test_several_policies_with_one_value_each_are_fine():
    o = InspectOptions("prefs/", policies=[PolicySpec("a"), PolicySpec("b")], alphas=[0.1])
    assert o.several_policies and not o.sweeps


def test_inspect_takes_options_or_keywords_not_both():
    with pytest.raises(TypeError, match="not both"):
        inspect_margins(InspectOptions("prefs/"), split="test")
    with pytest.raises(ConfigError, match="give --data"):
        inspect_margins(None)


def test_options_module_is_light():
    code = ("import sys; from alphadpo_cli.margins.options import NORM_MODES; from alphadpo_cli.margins import NORM_MODES; "
            "print(sorted(m for m in ('torch', 'numpy', 'alphadpo_cli.margins.series') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_package_exports_are_lazy_and_complete():
    import alphadpo_cli.margins as margins

    for name in margins.__all__:
        assert getattr(margins, name) is not None and name in dir(margins)
    assert NORM_MODES[0] == "auto" and "run" in NORM_MODES
    with pytest.raises(AttributeError):
        margins.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------------
# terminal rendering of a small report, from hand-made scores


def _scores(n: int = 6) -> PreferenceLogps:
    g = torch.Generator().manual_seed(0)
    lengths_c = torch.tensor([3.0, 5, 4, 6, 2, 7][:n], dtype=torch.float64)
    lengths_r = torch.tensor([4.0, 4, 5, 3, 6, 2][:n], dtype=torch.float64)

    def logps(lengths):
        return -lengths * (1 + torch.rand(n, generator=g, dtype=torch.float64))

    return PreferenceLogps(logps(lengths_c), logps(lengths_r), lengths_c, lengths_r, logps(lengths_c), logps(lengths_r))


def _report(method: str = "alpha_dpo", **params) -> MarginReport:
    sc = _scores()
    s = compute_series(sc, method, {"beta": 2.0, **params})
    pairs = [{"index": i, "row": i + 1, "prompt": f"prompt {i} " * 20, "chosen": f"good {i}", "rejected": f"bad {i}"}
             for i in range(6)]
    return MarginReport(pairs=pairs, policies=[PolicyScores("policy", "hand-made", sc, method, s.params)], series=[s],
                        dataset="hand-made", split="test", reference="given", norm="auto", norm_batch=4)


def _printed(report: MarginReport, **kwargs) -> str:
    console = Console(file=io.StringIO(), width=120)
    print_report(console, report, **kwargs)
    return console.file.getvalue()


def test_print_report_shows_every_part():
    rep = _report(alpha=0.2)
    text = _printed(rep, top_k=2, bins=3)
    for part in ("6 pairs", "hand-made [test]", "reference log-probs: given", "method alpha_dpo",
                 "normalisation (policy): z-scored over the 6 pairs", "per-pair quantities", "by series",
                 "g = Δθ−Δref", "margin m — policy", "top 2 pairs by margin", "bottom 2 pairs by margin", "+ good"):
        assert part in text, part
    top, bottom = rep.extremes(2)
    assert f"prompt {top[0]}" in text and f"prompt {bottom[0]}" in text
    assert "…" in text  # long prompts are clipped to the terminal


def test_print_report_of_a_constant_margin_shows_the_reward_difference():
    text = _printed(_report("simpo", gamma_beta_ratio=0.5), top_k=0)
    assert "reward difference (the margin is constant)" in text
    assert "top " not in text and "z " not in text.split("per-pair quantities")[1].split("by series")[0]


def test_run_table_lists_the_logged_metrics(tmp_path):
    info = RunInfo(tmp_path, None, [{"step": 1, "loss": 0.7, "margin/mean": 0.5},
                                    {"step": 2, "loss": 0.6, "margin/mean": 0.9}], False, False)
    console = Console(file=io.StringIO(), width=100)
    console.print(run_table(info))
    text = console.file.getvalue()
    assert "2 logged rows" in text and "margin/mean" in text and "normalizer/mu" not in text
    line = next(x for x in text.splitlines() if "loss" in x)
    assert [c.strip() for c in line.split("│")[1:-1]] == ["loss", "0.7", "0.6", "0.6", "0.7"]


# ---------------------------------------------------------------------------------------------
# the missing-split fallback (typed: MissingSplitError)


@pytest.fixture
def only_train(tmp_path):
    d = tmp_path / "only-train"
    d.mkdir()
    shutil.copy(PREFS / "train.jsonl", d / "train.jsonl")
    return d


def test_missing_eval_split_falls_back_to_train(only_train):
    said = []
    rep = inspect_margins(str(only_train), model="tiny-random", max_samples=4, norm="none", log=said.append)
    assert rep.split == "train" and len(rep.pairs) == 4
    assert said == [f"no 'test' split in {only_train}: using 'train'"]


def test_missing_split_asked_for_is_an_error(only_train):
    with pytest.raises(MissingSplitError, match="no file for split 'test'"):
        inspect_margins(str(only_train), model="tiny-random", split="test")
