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
    from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer, quiet_libraries

    quiet_libraries()  # as load_models does: peft reads transformers' deprecated `is_gradient_checkpointing`
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


# --- the sampled KL stops where generation stops: at the template's end of turn -----------------


GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
              "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
              "{% endif %}")


def _eot_tokenizer():
    """The tiny tokenizer with its own EOS (<eos>), while its ChatML template ends each turn with
    <|im_end|>: the end of turn is not EOS, as with Gemma (1 vs 107) and Llama-3 (128001 vs 128009)."""
    from alphadpo_cli.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"eos_token": "<eos>"})
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != eot
    return tok, eot


def test_the_stop_ids_are_eos_the_templates_end_of_turn_and_the_presets():
    from alphadpo_cli.evaluation.generate import stop_token_ids

    tok, eot = _eot_tokenizer()
    assert stop_token_ids(tok) == [tok.eos_token_id, eot]
    assert stop_token_ids(tok, [eot, 5, 10**9]) == [tok.eos_token_id, eot, 5]  # no repeats, inside the vocabulary
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_LIKE
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no special token after an answer
    assert stop_token_ids(tok) == [tok.eos_token_id]


def _model_that_ends_its_turn(vocab: int, eot: int, strength: float):
    """A tiny Llama whose next token is <|im_end|> with a logit of about strength * 5.7 against 0
    for every other token, whatever the input: every embedding carries +50 in dimension 0, which
    dominates the residual stream, and the head reads only that dimension, for that token only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 50.0
        head = model.get_output_embeddings().weight
        head.zero_()
        head[eot, 0] = strength
    return model.eval()


def test_sampled_kl_stops_at_the_templates_end_of_turn():
    from alphadpo_cli.data import uses_document_bos
    from alphadpo_cli.evaluation.generate import render_prompt
    from alphadpo_cli.evaluation.preference import sampled_kl

    tok, eot = _eot_tokenizer()
    policy = _model_that_ends_its_turn(len(tok), eot, 10.0)  # ends its turn at once, p ~ 1
    reference = _model_that_ends_its_turn(len(tok), eot, 0.1)  # almost uniform
    prompts = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Why is the sky blue?"}]]
    kl = sampled_kl(policy, reference, tok, prompts, samples=4, max_new_tokens=8, batch_size=2, seed=0)
    assert kl["mean_sampled_response_tokens"] == 1.0 and kl["truncated_fraction"] == 0.0

    def logp_eot(model, messages):  # the oracle: each prompt alone, one plain forward, the one sampled token
        ids = torch.tensor([render_prompt(tok, messages, bos=uses_document_bos(tok))])
        with torch.no_grad():
            return float(torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)[eot])

    per_prompt = [logp_eot(policy, m) - logp_eot(reference, m) for m in prompts]
    expected = sum(per_prompt[i % 2] for i in range(4)) / 4
    assert expected > 1.0  # the reference would rarely end here
    assert kl["kl_per_sequence"] == pytest.approx(expected, rel=1e-5)
    assert kl["kl_per_token"] == pytest.approx(expected, rel=1e-5)
