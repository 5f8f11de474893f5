"""examples/compare.py (`make compare`): the table it builds from given results, and its rows from a
run's train_results.json and an `eval reward` result."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compare_example", ROOT / "examples" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

EVAL = {"model_stats": {"extras": {"constraints_satisfied": 0.5, "all_constraints_satisfied": 0.25},
                        "mean_reward": 0.55, "reward_se": 0.04, "length_tokens": 31.25, "length_words": 20.0},
        "win": {"win_rate": 0.7, "win_rate_se": 0.05}}
TRAIN = {"seconds": 240.0, "eval_before": {"accuracy": 0.676, "accuracy_ref": 0.5}, "eval_after": {"accuracy": 0.761, "accuracy_ref": 0.7}}


def test_rows_from_training_and_evaluation_results():
    after = compare._row("α-DPO", TRAIN, EVAL)
    assert after["accuracy"] == 0.761 and after["accuracy_ref"] == 0.7 and after["constraints"] == 0.5
    assert after["win_rate"] == 0.7 and after["length_tokens"] == 31.25 and after["train_seconds"] == 240.0
    base = compare._row("base model", TRAIN, {"model_stats": {**EVAL["model_stats"], "extras": {}}, "win": None},
                        which="eval_before")
    assert base["accuracy"] == 0.676 and base["accuracy_ref"] is None  # 0.5 by construction before training
    assert base["win_rate"] is None and base["constraints"] is None and base["train_seconds"] is None


def test_table_cells_and_markdown():
    rows = [compare._row("base model", TRAIN, {"model_stats": {**EVAL["model_stats"], "reward_se": None}, "win": None},
                         which="eval_before"),
            compare._row("α-DPO", TRAIN, EVAL)]
    cells = compare.table_rows(rows)
    assert len(cells[0]) == len(compare.COLUMNS)
    assert cells[0] == ["base model", "0.676", "-", "50.0%", "25.0%", "-", "0.550", "31.2 / 20.0", "-"]
    assert cells[1] == ["α-DPO", "0.761", "0.700", "50.0%", "25.0%", "70.0% ± 5.0", "0.550 ± 0.040",
                        "31.2 / 20.0", "4.0 min"]
    md = compare.markdown(rows).splitlines()
    assert md[0].startswith("| method |") and md[1] == "|" + "---|" * len(compare.COLUMNS)
    assert md[3] == "| " + " | ".join(cells[1]) + " |"
