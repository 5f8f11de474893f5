"""`alphadpo compare` without training: its options and their checks (every mistake one error, exit
status 2, before any model loads), the runs it plans, the validation slice it carves and the table
it prints. The end-to-end run, its reference count and its resume: tests/test_compare_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from alphadpo_cli.cli.compare import compare
from alphadpo_cli.compare import CompareOptions, parse_grid, parse_seeds
from alphadpo_cli.compare.carve import HeldOut, carve_validation, held_out_keys
from alphadpo_cli.compare.options import check_options, seed_list
from alphadpo_cli.compare.plan import plan_runs, points_for
from alphadpo_cli.compare.report import table_cells
from alphadpo_cli.config import ConfigError, UserError, resolve_config
from alphadpo_cli.prompts import read_prompts


def test_grid_items_parse_and_apply_to_the_methods_that_have_the_parameter():
    a = parse_grid("loss.params.alpha=0.01,0.05,0.1,0.2")
    assert a.key == "loss.params.alpha" and a.values == (0.01, 0.05, 0.1, 0.2) and a.method is None
    assert a.applies_to("alpha_dpo") and not a.applies_to("simpo") and not a.applies_to("dpo")
    g = parse_grid("loss.params.gamma_beta_ratio=0.3,0.5")
    assert g.applies_to("alpha_dpo") and g.applies_to("simpo") and not g.applies_to("dpo")
    lr = parse_grid("dpo:training.learning_rate=1e-4,5e-4")
    assert lr.method == "dpo" and lr.applies_to("dpo") and not lr.applies_to("alpha_dpo")
    assert points_for("alpha_dpo", [a, g]) == [{"loss.params.alpha": x, "loss.params.gamma_beta_ratio": y}
                                               for x in (0.01, 0.05, 0.1, 0.2) for y in (0.3, 0.5)]
    assert points_for("dpo", [a, g]) == [{}]


@pytest.mark.parametrize("item, message", [
    ("loss.params.alpha", "expected KEY=V1,V2"),
    ("training.seed=1,2", "use --seeds"),
    ("data.dataset=a,b", "cannot be swept"),
    ("trainin.learning_rate=1,2", "unknown section"),
    ("loss.params.alpha=0.1,0.1", "given twice"),
])
def test_bad_grid_items_are_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(item)


@pytest.mark.parametrize("changes, message", [
    ({"losses": ("alpha_dpo", "nope")}, "unknown loss 'nope'"),
    ({"losses": ("dpo", "dpo")}, "twice"),
    ({"baseline_method": "simpo", "losses": ("alpha_dpo", "dpo")}, "not among --loss"),
    ({"grid": ("loss.params.alpha=0.1,0.2",), "losses": ("simpo", "dpo")}, "no method among simpo,dpo"),
    ({"grid": ("ipo:loss.params.beta=0.1,0.2",)}, "'ipo' is not among"),
    ({"validation": 0.0}, "--validation"),
    ({"preset": None}, "give --preset"),
])
def test_bad_options_are_refused_before_any_model_loads(changes, message):
    with pytest.raises(UserError, match=message):
        check_options(CompareOptions(**{"preset": "tiny", **changes}))


def test_seeds_are_a_count_or_a_list():
    assert parse_seeds("3") == 3 and seed_list(3, 42) == [42, 43, 44]
    assert parse_seeds("1,7,9") == (1, 7, 9) and seed_list((1, 7, 9), 42) == [1, 7, 9]
    with pytest.raises(ConfigError):
        seed_list(0, 42)
    with pytest.raises(ConfigError):
        parse_seeds("three")


def test_every_run_is_an_ordinary_train_config_in_its_own_directory(tmp_path):
    o = CompareOptions(preset="tiny", losses=("alpha_dpo", "dpo"), grid=("loss.params.alpha=0.05,0.1",), seeds=2)
    runs = plan_runs(o, check_options(o), [42, 43], tmp_path, [])
    assert [r.id for r in runs] == ["alpha_dpo/alpha=0.05/seed-42", "alpha_dpo/alpha=0.05/seed-43",
                                    "alpha_dpo/alpha=0.1/seed-42", "alpha_dpo/alpha=0.1/seed-43",
                                    "dpo/seed-42", "dpo/seed-43"]
    r = runs[2]
    assert r.config.loss.name == "alpha_dpo" and r.config.loss.params["alpha"] == 0.1
    assert r.config.training.seed == 42 and Path(r.config.training.output_dir) == tmp_path / "runs/alpha_dpo/alpha=0.1/seed-42"
    assert runs[4].config.loss == resolve_config(preset="tiny", loss="dpo").loss  # the preset's dpo variant


def test_a_bad_value_names_the_run():
    o = CompareOptions(preset="tiny", losses=("alpha_dpo",), grid=("loss.params.alpha=0.05,-3",))
    with pytest.raises(ConfigError, match=r"run alpha_dpo/alpha=-3/seed-1: .*alpha"):
        plan_runs(o, check_options(o), [1], Path("out"), [])


def test_validation_is_carved_from_training_prompts_disjoint_from_test(tmp_path):
    cfg = resolve_config(preset="tiny")
    test = HeldOut(cfg.data.dataset, "test", None)
    info = carve_validation(cfg, tmp_path, 0.1, test)
    val, _ = read_prompts(str(tmp_path), "validation")
    rest, _ = read_prompts(str(tmp_path), "train")
    everything, _ = read_prompts(cfg.data.dataset, "train")
    assert len(val) == info["validation_pairs"] and len(val) + len(rest) == len(everything)
    assert {p.key for p in val}.isdisjoint({p.key for p in rest})
    assert {p.key for p in val}.isdisjoint(held_out_keys(test))
    again = carve_validation(cfg, tmp_path / "again", 0.1, test)  # the same slice every time
    assert (tmp_path / "again" / "validation.jsonl").read_text() == (tmp_path / "validation.jsonl").read_text()
    assert again["validation_prompts"] == info["validation_prompts"] == round(0.1 * len({p.key for p in everything}))


def test_a_training_prompt_that_is_also_a_test_prompt_is_never_chosen_for_validation(tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "src" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    cfg = resolve_config(preset="tiny", overrides=[f"data.dataset={tmp_path / 'src'}"])
    info = carve_validation(cfg, tmp_path / "out", 0.2, HeldOut(str(tmp_path / "src"), "test"))
    val, _ = read_prompts(str(tmp_path / "out"), "validation")
    assert sorted(p.messages[0]["content"] for p in val) == ["question 8", "question 9"]
    assert info["kept_in_training_as_in_test"] == 8


def test_the_table_from_a_result():
    from alphadpo_cli.compare.summary import results_section

    iv = lambda m, se=None: {"n": 3, "mean": m, "se": se, "ci95": None}  # noqa: E731
    methods = [
        {"method": "alpha_dpo", "setting": "alpha=0.1", "seeds": [1, 2, 3], "runs": {},
         "metrics": {"accuracy": iv(0.7123, 0.0101), "mean_reward": iv(0.55, 0.02), "win_rate": iv(0.6, 0.05)}},
        {"method": "dpo", "setting": "(preset)", "seeds": [1, 2, 3], "runs": {},
         "metrics": {"accuracy": iv(0.65, 0.01), "mean_reward": iv(0.5, None), "win_rate": None}}]
    result = {"results": results_section(methods, {"accuracy": 0.6, "mean_reward": 0.5}, [], "base")}
    headers, rows = table_cells(result)
    assert headers == ["model", "setting", "n", "acc (test)", "reward", "win vs base"]
    assert rows[0] == ["base model", "", "", "0.600", "0.500", "-"]
    assert rows[1] == ["alpha_dpo", "alpha=0.1", "3 seeds", "0.712 ± 0.010", "0.550 ± 0.020", "60.0% ± 5.0"]
    assert rows[2] == ["dpo", "(preset)", "3 seeds", "0.650 ± 0.010", "0.500", "-"]


def test_the_command_refuses_bad_input_with_exit_status_2(tmp_path):
    r = CliRunner().invoke(compare, ["--preset", "tiny", "--loss", "alpha_dpo,simpo", "--grid", "loss.params.alpha=1,2",
                                     "--baseline-method", "dpo", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--baseline-method 'dpo' is not among --loss" in r.output
    r = CliRunner().invoke(compare, ["--preset", "tiny", "--seeds", "two", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--seeds" in r.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_grid_is_chosen_on_validation_and_the_test_numbers_never_choose(tmp_path):
    from alphadpo_cli.artefacts import WorkLog
    from alphadpo_cli.compare.driver import Comparison, choose
    from alphadpo_cli.compare.summary import summarise

    o = CompareOptions(preset="tiny", losses=("alpha_dpo", "dpo"), grid=("loss.params.alpha=0.05,0.1",), seeds=2)
    axes = check_options(o)
    runs = plan_runs(o, axes, [1, 2], tmp_path, [])
    c = Comparison(o, axes, [1, 2], runs, HeldOut("d", "test"), None, tmp_path,
                   log=WorkLog(tmp_path / "log.jsonl", {"t": 1}, kind="test"))
    validation = {"alpha_dpo/alpha=0.05/seed-1": 0.70, "alpha_dpo/alpha=0.05/seed-2": 0.72,
                  "alpha_dpo/alpha=0.1/seed-1": 0.74, "alpha_dpo/alpha=0.1/seed-2": 0.74,
                  "dpo/seed-1": 0.6, "dpo/seed-2": 0.62}
    for run_id, acc in validation.items():
        c.record("train", run_id, eval_after={"accuracy": acc, "accuracy_ref": 0.5}, seconds=1.0)
        c.record("test", run_id, report={"accuracy": 1.0 - acc})  # the test set would choose the other point
    chosen = choose(c)
    assert chosen["alpha_dpo"]["name"] == "alpha=0.1" and chosen["dpo"]["point"] == {}
    result = summarise(c)
    alpha = result["methods"][0]
    assert alpha["setting"] == "alpha=0.1" and list(alpha["runs"]) == ["alpha_dpo/alpha=0.1/seed-1",
                                                                       "alpha_dpo/alpha=0.1/seed-2"]
    assert alpha["metrics"]["accuracy"]["mean"] == pytest.approx(0.26)  # reported on test
    assert alpha["metrics"]["validation_accuracy"]["mean"] == pytest.approx(0.74)
    assert [row["accuracy"]["mean"] for row in alpha["grid"]] == pytest.approx([0.71, 0.74])
    c.log.close()
