"""The reward interface: Python functions by name, and Hugging Face reward models (a tiny random
sequence-classification model built from a config; no hub)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alphadpo_cli.config import ConfigError
from alphadpo_cli.rewards import FunctionReward, RewardItem, load_reward, prompt_text

ROOT = Path(__file__).resolve().parent.parent
VERIFIABLE = f"{ROOT / 'examples' / 'verifiable_reward.py'}:reward"


def _item(response, constraints=(), finished=True, prompt="Why is the sky blue? Do not use any commas."):
    return RewardItem([{"role": "user", "content": prompt}], response, {"constraints": list(constraints)}, finished)


def test_verifiable_reward_by_file_path():
    reward = load_reward(VERIFIABLE)
    assert isinstance(reward, FunctionReward)
    got = reward.score([_item("the sky scatters blue light.", ["no_commas", "lowercase"]),
                        _item("The sky, it is blue.", ["no_commas", "lowercase"]),
                        _item("", ["no_commas"])])
    assert [g.extras["constraints_satisfied"] for g in got] == [1.0, 0.0, 1.0]
    assert [g.extras["all_constraints_satisfied"] for g in got] == [1.0, 0.0, 1.0]
    # score: constraint share + a brevity tie-break; an empty answer scores 0
    assert 1.0 < got[0].score <= 1.1 and 0.0 <= got[1].score <= 0.1 and got[2].score == 0.0
    # cut off by the token budget: no tie-break
    assert reward.score([_item("the sky scatters blue light.", ["no_commas"], finished=False)])[0].score == 1.0


def test_function_reward_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def length(prompt, response, row):\n    return len(response) + 10 * row['bonus']\n"
        "def bad(prompt, response, row):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("my_reward:length")
    assert [s.score for s in reward.score([RewardItem([], "abc", {"bonus": 1}), RewardItem([], "", {"bonus": 0})])] == [13.0, 0.0]
    with pytest.raises(ConfigError, match="not a number"):
        load_reward("my_reward:bad").score([RewardItem([], "x")])
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward("my_reward:nope")
    with pytest.raises(ConfigError, match="no file"):
        load_reward(str(tmp_path / "missing.py") + ":f")
    sys.modules.pop("my_reward", None)


def test_prompt_text_reads_the_user_turns():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert prompt_text(msgs) == "a\n\nc"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alphadpo_cli.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_hf_reward_model_scores_each_pair_as_alone(reward_model_dir):
    reward = load_reward(str(reward_model_dir), batch_size=2, dtype="fp32", device="cpu")
    items = [_item("short"), _item("a much longer answer " * 5), _item("mid length answer"), _item("x")]
    batched = [s.score for s in reward.score(items)]
    alone = [reward.score([it])[0].score for it in items]
    assert batched == pytest.approx(alone, abs=1e-5)  # length-sorted batches, right padding: no effect
    assert len(set(round(b, 6) for b in batched)) == 4
    # rendered with the reward model's own template, ending in the answer
    text = reward.tokenizer.decode(reward.encode(items[0]))
    assert text.startswith("<|im_start|>") and "short" in text


def test_hf_reward_model_uses_a_score_output_when_the_model_has_one(reward_model_dir):
    reward = load_reward(str(reward_model_dir), dtype="fp32", device="cpu")

    class WithScore(torch.nn.Module):  # what ArmoRM's own code returns
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            out = self.inner(**kw)
            out.score = out.logits[:, 0] * 0 + 7.0
            return out

    reward.model = WithScore(reward.model)
    assert [s.score for s in reward.score([_item("a"), _item("bb")])] == [7.0, 7.0]
