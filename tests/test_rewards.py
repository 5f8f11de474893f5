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




# A reward model with its own code, as ArmoRM ships it: a config and a model class named by the
# config's auto_map, loaded with trust_remote_code, returning `score` (and per-objective `rewards`)
# instead of `logits`. The score is a fixed mix of two heads, read where ArmoRM's code reads: before
# the first pad id, or at the last token when the config has no pad id (then one row at a time).
_REMOTE_CONFIG = """
from transformers import LlamaConfig


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armo"
"""
_REMOTE_MODEL = """
from dataclasses import dataclass

import torch
from transformers import LlamaModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_tiny_armo import TinyArmoConfig


@dataclass
class TinyArmoOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    score: torch.FloatTensor = None


class TinyArmoModel(PreTrainedModel):
    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 2, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pad = self.config.pad_token_id
        if pad is None and input_ids.shape[0] != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None:
            last = -1
        else:
            last = (torch.eq(input_ids, pad).int().argmax(-1) - 1) % input_ids.shape[-1]
        rewards = self.regression_layer(hidden[torch.arange(hidden.shape[0]), last])
        score = (rewards * torch.tensor([0.75, 0.25], dtype=rewards.dtype)).sum(dim=-1, keepdim=True)
        return TinyArmoOutput(rewards=rewards, score=score)
"""


@pytest.fixture(scope="module")
def remote_code_reward_dir(tmp_path_factory):
    import importlib
    import json

    from alphadpo_cli.models.loading import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("armo")
    (out / "configuration_tiny_armo.py").write_text(_REMOTE_CONFIG)
    (out / "modeling_tiny_armo.py").write_text(_REMOTE_MODEL)
    tok = build_tiny_tokenizer()
    sys.path.insert(0, str(out))
    try:  # build and save it once from the same source the loader will import
        cfg_mod = importlib.import_module("configuration_tiny_armo")
        ns: dict = {}
        exec(compile(_REMOTE_MODEL.replace("from .configuration_tiny_armo", "from configuration_tiny_armo"),
                     str(out / "modeling_tiny_armo.py"), "exec"), ns)
        cfg = cfg_mod.TinyArmoConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=None)
        torch.manual_seed(0)
        ns["TinyArmoModel"](cfg).save_pretrained(out)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("configuration_tiny_armo", None)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny_armo.TinyArmoConfig",
                          "AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoModel"}
    (out / "config.json").write_text(json.dumps(config))
    tok.pad_token = None  # like Llama 3's: padding with EOS (<|im_end|>, inside every row) would misread
    tok.save_pretrained(out)
    return out


def test_a_reward_model_with_its_own_code_is_scored_by_its_score_output(remote_code_reward_dir):
    with pytest.raises(Exception, match="trust_remote_code|custom code"):
        load_reward(str(remote_code_reward_dir), dtype="fp32", device="cpu")  # its code never runs unasked
    reward = load_reward(str(remote_code_reward_dir), dtype="fp32", device="cpu", batch_size=2, trust_remote_code=True)
    assert type(reward.model).__name__ == "TinyArmoModel"
    items = [_item("a"), _item("a longer answer than that " * 3), _item("bb"), _item("ccc")]
    got = [s.score for s in reward.score(items)]
    # each pair alone, unpadded, through the model as shipped (no pad id: it reads the last token)
    from transformers import AutoModelForSequenceClassification

    shipped = AutoModelForSequenceClassification.from_pretrained(str(remote_code_reward_dir), trust_remote_code=True)
    assert shipped.config.pad_token_id is None and reward.tokenizer.pad_token_id is None
    expected = []
    for it in items:
        ids = torch.tensor([reward.encode(it)])
        assert reward.tokenizer.eos_token_id in ids[0, :-1].tolist()  # EOS ends the user's turn too
        with torch.no_grad():
            out = shipped(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert out.score.shape == (1, 1)
        expected.append(float((out.rewards[0] * torch.tensor([0.75, 0.25])).sum()))
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(g, 6) for g in got)) == 4


# --- long inputs keep their end; unusable scores are refused (functions) or left out (models) ------


def _long_item():
    return _item("the final words of the answer", prompt="a very long question " * 12)


def test_a_long_input_is_cut_from_the_left_and_marked(reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    reward = load_reward(str(reward_model_dir), batch_size=2, dtype="fp32", device="cpu", max_length=96)
    shipped = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir)).eval()
    tok = reward.tokenizer

    def alone(ids):
        with torch.no_grad():
            return float(shipped(input_ids=torch.tensor([ids])).logits[0, 0])

    def full_ids(item):
        text = tok.apply_chat_template([*item.prompt, {"role": "assistant", "content": item.response}], tokenize=False)
        return tok(text, add_special_tokens=False).input_ids

    long, short = _long_item(), _item("ok", prompt="hi")
    full = full_ids(long)
    assert len(full) > 96 and len(full_ids(short)) <= 96
    got = reward.score([long, short])
    # the last 96 ids: the end of the answer and the template's closing tokens, what the head reads
    assert full[-2] == tok.eos_token_id and tok.decode(full[-96:]).endswith("the final words of the answer<|im_end|>\n")
    assert got[0].score == pytest.approx(alone(full[-96:]), abs=1e-5) and got[0].cut
    assert got[1].score == pytest.approx(alone(full_ids(short)), abs=1e-5) and not got[1].cut
    assert got[0].score != pytest.approx(alone(full[:96]), abs=1e-5)  # not what a cut from the right reads
    # a template that writes a BOS first: the BOS stays, the rest is the end
    reward.tokenizer.chat_template = "{{ bos_token }}" + tok.chat_template
    full = full_ids(long)
    assert full[0] == tok.bos_token_id
    kept = [tok.bos_token_id] + full[-95:]
    assert reward.encode(long) == kept
    assert reward.score([long])[0].score == pytest.approx(alone(kept), abs=1e-5)


@pytest.mark.parametrize("value", ['float("nan")', 'float("inf")', '"high"', "None", '{"score": float("nan")}',
                                   '{"score": 1.0, "share": float("-inf")}'])
def test_a_function_returning_no_finite_number_is_refused_naming_the_row(tmp_path, value):
    (tmp_path / "bad_reward.py").write_text(f"def reward(prompt, response, row):\n    return {value}\n")
    reward = load_reward(f"{tmp_path / 'bad_reward.py'}:reward")
    item = RewardItem([{"role": "user", "content": "What is the capital of France?"}], "Paris", {}, True,
                      "prompts.jsonl, row 7")
    with pytest.raises(ConfigError) as err:
        reward.score([item])
    msg = str(err.value)
    assert "bad_reward.py:reward" in msg and "prompts.jsonl, row 7" in msg and "capital of France" in msg
    assert "finite" in msg


def test_numbers_of_any_kind_are_scores():
    import numpy as np

    fn = FunctionReward(lambda p, r, row: row["v"], "f")
    values = [True, 3, np.float32(0.5), np.int64(2), torch.tensor(1.5)]
    got = fn.score([RewardItem([], "x", {"v": v}) for v in values])
    assert [g.score for g in got] == [1.0, 3.0, 0.5, 2.0, 1.5]


def test_a_reward_model_item_with_a_non_finite_output_is_marked_failed(reward_model_dir):
    reward = load_reward(str(reward_model_dir), batch_size=2, dtype="fp32", device="cpu")
    good = reward.score([_item("a"), _item("bb")])
    assert all(s.ok for s in good)
    with torch.no_grad():
        reward.model.score.weight.fill_(float("nan"))
    got = reward.score([_item("a"), _item("bb")])
    assert [s.ok for s in got] == [False, False] and "nan" in got[0].failed
