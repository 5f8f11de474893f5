"""`alphadpo eval preference`: the offline held-out report on the tiny model (no judge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alphadpo_cli.evaluation import evaluate

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"
SMALL = dict(data=str(PREFS), split="test", max_samples=4, batch_size=4, kl_max_new_tokens=12, max_length=256,
             max_prompt_length=128, quiet=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """A LoRA adapter on the tiny model with non-zero (random) weights, so policy != reference."""
    from peft import LoraConfig, get_peft_model

    from alphadpo_cli.config import ModelConfig
    from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    base = build_tiny_model(ModelConfig(), vocab_size=len(tok))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    return out


def test_identical_reference_gives_zero_kl_and_tied_ref_rewards(tmp_path):
    out = tmp_path / "r.json"
    res = evaluate("preference", model="tiny-random", ref_model="tiny-random", kl_samples=3, output=str(out), **SMALL)
    assert res["pairs"] == 4
    assert res["reward_accuracy_ref"] == pytest.approx(0.5) and res["margin_ref"] == pytest.approx(0.0, abs=1e-9)
    assert res["kl"]["samples"] == 3 and res["kl"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert 1 <= res["kl"]["mean_sampled_response_tokens"] <= 12
    assert 0.0 <= res["reward_accuracy_simpo"] <= 1.0
    saved = json.loads(out.read_text())
    assert saved["reward_accuracy_simpo"] == res["reward_accuracy_simpo"] and saved["kl"]["samples"] == 3


def test_lora_policy_against_adapter_disabled_reference(adapter_dir, tmp_path):
    res = evaluate("preference", model="tiny-random", adapter=str(adapter_dir), kl_samples=4,
                   output=str(tmp_path / "r.json"), **SMALL)
    assert res["reference"] == "the policy with its adapters disabled"
    assert res["margin_ref"] != 0.0 and res["logratio_per_token_on_data"] != 0.0
    kl = res["kl"]
    assert kl["samples"] == 4 and kl["kl_per_token"] == kl["kl_per_token"]  # finite
    assert kl["kl_per_sequence"] == pytest.approx(kl["kl_per_token"] * kl["mean_sampled_response_tokens"], rel=1e-6)
    assert res["length_chosen_tokens"] > 0 and res["length_rejected_tokens"] > 0


def test_full_model_without_reference_skips_ref_metrics(tmp_path):
    res = evaluate("preference", model="tiny-random", kl_samples=2, output=str(tmp_path / "r.json"), **SMALL)
    assert res["reward_accuracy_ref"] is None and res["kl"] is None and "none" in res["reference"]


def test_cli_table_and_json(adapter_dir, tmp_path):
    from alphadpo_cli.cli import main

    out = tmp_path / "report.json"
    r = CliRunner().invoke(main, ["eval", "preference", "--model", "tiny-random", "--adapter", str(adapter_dir),
                                  "--data", str(PREFS), "--max-samples", "2", "--kl-samples", "2",
                                  "--kl-max-new-tokens", "6", "--max-length", "256", "--max-prompt-length", "128",
                                  "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "reward accuracy (implicit SimPO" in r.output and "KL(πθ‖πref) per token" in r.output
    assert json.loads(out.read_text())["pairs"] == 2


def test_cli_bad_data_exits_2(tmp_path):
    from alphadpo_cli.cli import main

    r = CliRunner().invoke(main, ["eval", "preference", "--model", "tiny-random", "--data", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "Traceback" not in r.output
