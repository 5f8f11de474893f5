"""`alphadpo compare` end to end on the tiny model: 2 methods × 2 seeds × a 2-value grid, the setting
chosen on validation, the reference computed once for all runs, the validation and test prompts
disjoint, and a killed comparison resumed to the same table without retraining what had finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alphadpo_cli.compare import CompareOptions, run_compare
from alphadpo_cli.compare.report import table_cells
from alphadpo_cli.prompts import read_prompts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REWARD = f"{ROOT / 'examples' / 'verifiable_reward.py'}:reward"
OPTIONS = dict(preset="tiny", losses=("alpha_dpo", "dpo"), grid=("loss.params.beta=2.5,1.0",), seeds=2,
               reward=REWARD, max_new_tokens=4, validation=0.05, quiet=True,
               overrides=("training.max_steps=2", "data.max_samples=16", "data.max_eval_samples=8"))


def killable_options(out) -> CompareOptions:
    """OPTIONS for α-DPO's seed 42 only (its two grid points), with a checkpoint every step
    (tests/compare_kill_driver.py kills a run after one)."""
    return CompareOptions(**{**OPTIONS, "losses": ("alpha_dpo",), "seeds": (42,),
                             "overrides": OPTIONS["overrides"] + ("training.save_steps=1",)}, output_dir=str(out))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One comparison, in a cache of its own so that what it computes can be counted."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALPHADPO_CACHE", str(root / "cache"))
        result = run_compare(CompareOptions(**OPTIONS, output_dir=str(root / "out")))
        yield root, result, mp


def test_end_to_end(finished):
    root, result, _ = finished
    out = root / "out"
    assert [m["method"] for m in result["methods"]] == ["alpha_dpo", "dpo"]
    for m in result["methods"]:
        assert m["setting"] in ("beta=2.5", "beta=1.0") and m["seeds"] == [42, 43]
        assert [row["name"] for row in m["grid"]] == ["beta=2.5", "beta=1.0"]
        for run_dir in m["runs"].values():  # ordinary train run directories
            assert (Path(run_dir) / "config.yaml").is_file() and (Path(run_dir) / "adapter_config.json").is_file()
        for key in ("accuracy", "validation_accuracy", "mean_reward", "win_rate", "constraints_satisfied"):
            assert m["metrics"][key]["n"] == 2 and m["metrics"][key]["ci95"] is not None
    assert len(list((out / "runs").glob("*/*/seed-*"))) == 8
    paired = result["paired"]
    assert len(paired) == 1 and paired[0]["method"] == "alpha_dpo" and paired[0]["baseline"] == "dpo"
    assert paired[0]["n_pairs"] == 2 * 8 and paired[0]["n_seeds"] == 2
    assert json.loads((out / "compare.json").read_text())["methods"] == result["methods"]
    from alphadpo_cli.results import read_results

    shared = read_results(out / "compare.json")  # the format rounds.json shares
    assert [r["kind"] for r in shared["rows"]] == ["base", "method", "method"]
    assert (out / "compare.png").stat().st_size > 0 and (out / "grid.png").stat().st_size > 0
    assert (out / "eval" / "base" / "answers.json").is_file()  # generated once, the baseline of every run


def test_the_reference_and_the_tokenisation_are_computed_once_for_all_runs(finished):
    root, _, _ = finished
    # 8 runs (α-DPO and DPO both need the reference): one reference entry per split (train and
    # validation), one tokenised entry per split (train, validation, test)
    assert len(list((root / "cache" / "reference").iterdir())) == 2
    assert len(list((root / "cache" / "tokenized").iterdir())) == 3


def test_validation_and_test_are_disjoint(finished):
    root, result, _ = finished
    val = {p.key for p in read_prompts(str(root / "out" / "data"), "validation")[0]}
    rest = {p.key for p in read_prompts(str(root / "out" / "data"), "train")[0]}
    test = result["test"]
    held_out = {p.key for p in read_prompts(test["data"], test["split"], max_prompts=test["max_samples"])[0]}
    assert val and val.isdisjoint(held_out) and val.isdisjoint(rest)
    assert result["validation"]["validation_pairs"] == len(read_prompts(str(root / "out" / "data"), "validation")[0])


def test_other_settings_are_refused_listing_the_changes(finished):
    root, _, _ = finished
    from alphadpo_cli.config import ConfigError

    with pytest.raises(ConfigError, match=r"seeds: 2 there, 3 now.*--overwrite"):
        run_compare(CompareOptions(**{**OPTIONS, "seeds": 3}, output_dir=str(root / "out")))
    assert os.path.isfile(root / "out" / "compare.json")


def test_a_killed_comparison_resumes_to_the_same_table(finished):
    """(last: it cuts the comparison's own log back, as a kill would have left it)"""
    root, result, _ = finished
    out = root / "out"
    log = out / "compare.log.jsonl"
    lines = log.read_text().splitlines()
    trained = [i for i, line in enumerate(lines) if json.loads(line).get("kind") == "train"]
    keep = trained[5]  # killed while training the 7th run: 6 runs recorded, and half a line
    log.write_text("\n".join(lines[:keep + 1]) + "\n" + lines[keep + 1][:25])
    (out / "compare.json").unlink()
    kept_run = Path(json.loads(lines[trained[0]])["run"])
    weights = out / "runs" / kept_run / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_compare(CompareOptions(**OPTIONS, output_dir=str(out)))
    assert weights.stat().st_mtime_ns == before  # a finished run is not trained again
    assert table_cells(again) == table_cells(result)
    assert [m["metrics"] for m in again["methods"]] == [m["metrics"] for m in result["methods"]]
    records = [json.loads(x) for x in log.read_text().splitlines()[1:]]
    assert sum(r["kind"] == "train" for r in records) == 8


def test_a_run_killed_mid_training_resumes_from_its_checkpoint(finished, tmp_path):
    """A real kill (SIGKILL after the second run's checkpoint of step 1): the rerun keeps the
    finished run, resumes the second from its checkpoint, and its numbers are those of the
    uninterrupted comparison's same runs."""
    root, result, _ = finished
    out, killed = tmp_path / "out", "alpha_dpo/beta=1.0/seed-42"
    env = {**os.environ, "ALPHADPO_CACHE": str(root / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compare_kill_driver.py"), str(out), killed],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "runs" / killed / "checkpoints").is_dir() and not (out / "compare.json").exists()
    again = run_compare(killable_options(out))
    records = [json.loads(x) for x in (out / "compare.log.jsonl").read_text().splitlines()[1:]]
    resumed = next(r for r in records if r["kind"] == "train" and r["run"] == killed)
    assert resumed["resumed_from_step"] == 1
    assert sum(r["kind"] == "train" for r in records) == 2
    uninterrupted = result["methods"][0]
    assert again["methods"][0]["setting"] == uninterrupted["setting"]
    for run_id, numbers in again["methods"][0]["per_run"].items():
        drop = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}  # noqa: E731
        assert drop(numbers) == drop(uninterrupted["per_run"][run_id])
