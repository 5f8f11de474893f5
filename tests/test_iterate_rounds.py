"""`alphadpo iterate` end to end on the tiny random model: two rounds for each reference choice ×
{lora, full}; round 2 starts from round 1's model; with `previous` + LoRA round 2's reference is
π_1; a kill in each phase then a resume gives the run an uninterrupted one gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iterate_kill_driver import options  # noqa: E402

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).resolve().parent / "iterate_kill_driver.py"
COMBOS = [("lora", "previous"), ("lora", "initial"), ("full", "previous"), ("full", "initial")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("iterate-inputs")
    (d / "reward.py").write_text("def reward(prompt, response, row):\n"
                                 "    return (sum(map(ord, response)) % 101) / 101.0\n")
    rows = [{"prompt": f"Write about topic number {i}.", "topic": i} for i in range(10)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "prompts.jsonl", f"{d / 'reward.py'}:reward"


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """The four experiments, each run once for the tests below."""
    from alphadpo_cli.iterate import run_iterate

    out = {}
    for mode, ref in COMBOS:
        d = tmp_path_factory.mktemp(f"iterate-{mode}-{ref}")
        out[mode, ref] = (d, run_iterate(options(d, mode, ref, *inputs)))
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_two_rounds_end_to_end(runs, combo):
    d, rec = runs[combo]
    assert [r["round"] for r in rec["rounds"]] == [1, 2]
    for r in rec["rounds"]:
        assert r["sample"]["pairs"] >= 1 and r["train"]["steps"] == 2
        assert r["judge"]["n"] == 2 and r["judge"]["win_vs_initial"] is not None
        assert r["judge"]["win_vs_previous"] is not None
    assert rec["initial"]["reward"] is not None and rec["final_model"] == rec["rounds"][-1]["model"]
    assert json.loads((d / "rounds.json").read_text())["rounds"][1]["train"]["steps"] == 2
    from alphadpo_cli.results import read_results

    shared = read_results(d / "rounds.json")  # the format compare.json shares
    assert [r["name"] for r in shared["rows"]] == ["π0", "round 1", "round 2"]
    assert shared["rows"][2]["metrics"]["win_rate"]["mean"] == rec["rounds"][1]["judge"]["win_vs_initial"]
    assert (d / "rounds.png").is_file()
    progress = [json.loads(line) for line in (d / "progress.jsonl").read_text().splitlines()[1:]]
    assert [(p["round"], p["phase"]) for p in progress] == [(0, "judge")] + [
        (k, p) for k in (1, 2) for p in ("sample", "train", "judge")]


def _round2_models(d: Path):
    """Round 2's starting policy and reference, loaded as its training loads them."""
    from alphadpo_cli.config import load_config_file
    from alphadpo_cli.models.loading import load_models

    cfg = load_config_file(d / "round-2" / "train" / "config.yaml")
    return load_models(cfg.model, cfg.lora, need_reference_model=cfg.model.mode == "full")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(ref: str):
    from alphadpo_cli.models.inference import load_for_inference

    return load_for_inference(ref, dtype="fp32", device="cpu")[0]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_round_two_trains_from_round_one(runs, combo):
    d, rec = runs[combo]
    ids = torch.tensor([[5, 17, 60, 99, 120, 33, 7, 250]])
    start = _logits(_round2_models(d).policy, ids)
    pi1 = _logits(_load(rec["rounds"][0]["model"]), ids)
    pi0 = _logits(_load("tiny-random"), ids)
    assert torch.allclose(start, pi1, atol=1e-4), (start - pi1).abs().max()
    assert not torch.allclose(start, pi0, atol=1e-3)


def test_previous_lora_reference_is_pi1(runs):
    """After the merge, round 2's reference (its policy with the adapter disabled) is π_1 (the
    adapter of round 1 on its base), sequence by sequence."""
    from alphadpo_cli.models.adapters import reference_mode

    d, rec = runs["lora", "previous"]
    models = _round2_models(d)
    pi1 = _load(str(d / "round-1" / "train"))  # round 1's adapter on π_0, not the merged copy
    for seq in ([5, 17, 60, 99], [200, 3, 3, 41, 90, 11]):
        ids = torch.tensor([seq])
        with reference_mode(models.policy, models.reference) as ref:
            got = _logits(ref, ids).log_softmax(-1)
        want = _logits(pi1, ids).log_softmax(-1)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def _same_run(a: Path, b: Path) -> None:
    for k in (1, 2):
        for name in ("data/train.jsonl", "prompts.jsonl", "eval/answers.json"):
            assert (a / f"round-{k}" / name).read_bytes() == (b / f"round-{k}" / name).read_bytes(), (k, name)
        losses = [[json.loads(line)["loss"] for line in (d / f"round-{k}/train/metrics.jsonl").read_text().splitlines()]
                  for d in (a, b)]
        assert losses[0] == losses[1]
    ja, jb = (json.loads((d / "rounds.json").read_text()) for d in (a, b))
    assert [r["judge"]["reward"] for r in ja["rounds"]] == [r["judge"]["reward"] for r in jb["rounds"]]


def test_a_kill_in_each_phase_then_resume_gives_the_same_run(runs, inputs, tmp_path):
    """One experiment killed (SIGKILL) in round 2's sampling, then in its training, then in its
    judging, each time resumed by the same command, ends as the uninterrupted run did."""
    out = tmp_path / "killed"
    base = [sys.executable, str(DRIVER), str(out), "lora", "previous", str(inputs[0]), inputs[1]]
    for kill_at, phase in (("sample", "sample"), ("train", "train"), ("judge", "judge")):
        r = subprocess.run(base + [kill_at], capture_output=True, text=True, timeout=600)
        assert r.returncode == -9, r.stderr[-2000:]
        done = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()[1:]]
        assert (2, phase) not in [(p["round"], p["phase"]) for p in done]
    assert list((out / "round-2" / "train" / "checkpoints").iterdir())  # the train kill left a checkpoint
    r = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_run(runs["lora", "previous"][0], out)
