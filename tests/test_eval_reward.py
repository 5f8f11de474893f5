"""`alphadpo eval reward`: the report's numbers by hand, resuming, the verifiable reward's constraint
shares, baselines (a model, an answers file, a run's base), and clear errors before any model loads.
Generation runs on `tiny-random` with a few new tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from alphadpo_cli.config import ConfigError
from alphadpo_cli.data import DataError, MissingSplitError
from alphadpo_cli.evaluation.generate import ChatGenerator
from alphadpo_cli.evaluation.options import DecodingOptions, ModelSpec, OutputOptions, RewardOptions
from alphadpo_cli.models.sources import SourceError
from alphadpo_cli.prompts import PromptRow
from alphadpo_cli.rewards import Scored
from alphadpo_cli.rewards import evaluate as ev

ROOT = Path(__file__).resolve().parent.parent
VERIFIABLE = f"{ROOT / 'examples' / 'verifiable_reward.py'}:reward"
FAST = dict(model="tiny-random", max_new_tokens=4, batch_size=4, quiet=True)  # as flat keywords


def _options(reward: str, data: str, out, *, baseline: str | None = None, max_new_tokens: int = 4,
             reward_max_length: int = 4096, **kw) -> ev.RewardEvalOptions:
    """The options of a quick run: tiny-random, 4 new tokens, batches of 4, quiet."""
    return ev.RewardEvalOptions(reward=RewardOptions(reward, max_length=reward_max_length), data=data,
                                model=ModelSpec("tiny-random"), baseline=baseline,
                                decoding=DecodingOptions(max_new_tokens=max_new_tokens, batch_size=4),
                                output=OutputOptions(output_dir=str(out), quiet=True), **kw)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    {"prompt": "Name a colour. Do not use any commas.", "chosen": "blue", "rejected": "red, green",
     "constraints": ["no_commas"]},
    {"prompt": "Say hi in lowercase. Do not use any commas.", "chosen": "hi there", "rejected": "Hi, there",
     "constraints": ["lowercase", "no_commas"]},
    {"prompt": "Answer in at most 3 words.", "chosen": "yes indeed", "rejected": "well, that depends a lot",
     "constraints": ["max_words:3"]},
]


@pytest.fixture
def data(tmp_path) -> str:
    d = tmp_path / "data"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(d)


@pytest.fixture
def length_reward(tmp_path) -> str:
    (tmp_path / "lr.py").write_text(
        "def reward(prompt, response, row):\n"
        "    return {'score': float(len(response.split())), 'has_row': float('constraints' in row)}\n"
        "def broken(prompt, response, row):\n"
        "    return row['no_such_field']\n")
    return str(tmp_path / "lr.py")


def _answers_file(path: Path, outputs: list[str]) -> str:
    path.write_text(json.dumps([{"prompt": r["prompt"], "output": o} for r, o in zip(ROWS, outputs)]))
    return str(path)


@pytest.fixture
def count_generations(monkeypatch):
    calls = []
    real = ChatGenerator.generate

    def counting(self, batch, seed_key=""):
        calls.append(len(batch))
        return real(self, batch, seed_key)

    monkeypatch.setattr(ChatGenerator, "generate", counting)
    return calls


def test_report_numbers_by_hand():
    prompts = [PromptRow([{"role": "user", "content": f"q{i}"}], {}, f"row {i}") for i in range(4)]
    k = [p.key for p in prompts]
    mine = {k[0]: {"output": "a b", "tokens": 3, "finish": "stop"}, k[1]: {"output": "a", "tokens": 1, "finish": "stop"},
            k[2]: {"output": "same", "tokens": 2, "finish": "length"}, k[3]: {"output": "x y z", "tokens": 6, "finish": "stop"}}
    theirs = {k[0]: {"output": "c", "tokens": 1}, k[1]: {"output": "d", "tokens": 1},
              k[2]: {"output": "same", "tokens": 2}, k[3]: {"output": "w", "tokens": 1}}
    scores = [Scored(1.0, {"ok": 1.0}), Scored(0.0, {"ok": 0.0}), Scored(2.0, {"ok": 1.0}), Scored(3.0, {"ok": 1.0})]
    base = [Scored(0.5), Scored(0.0), Scored(1.0), Scored(4.0)]  # win, tie (equal), tie (same text), loss
    rep = ev.summarize(prompts, mine, scores, theirs, base)
    m = rep["model_stats"]
    assert m["mean_reward"] == pytest.approx(1.5)
    sd = math.sqrt(sum((x - 1.5) ** 2 for x in (1.0, 0.0, 2.0, 3.0)) / 3)
    assert m["reward_se"] == pytest.approx(sd / 2)
    assert m["extras"] == {"ok": pytest.approx(0.75)}
    assert m["length_tokens"] == pytest.approx(3.0) and m["length_words"] == pytest.approx(7 / 4)
    assert m["truncated"] == pytest.approx(0.25)
    w = rep["win"]
    assert (w["wins"], w["ties"], w["losses"]) == (1, 2, 1) and w["win_rate"] == pytest.approx(0.5)
    assert w["win_rate_se"] == pytest.approx(math.sqrt((0.25 + 0 + 0 + 0.25) / 3) / 2)
    assert rep["baseline_stats"]["mean_reward"] == pytest.approx(5.5 / 4)
    assert rep["baseline_stats"]["extras"] == {}
    one = ev.summarize(prompts[:1], mine, scores[:1])
    assert one["model_stats"]["reward_se"] is None and one["win"] is None and one["baseline_stats"] is None


def test_end_to_end_against_an_answers_file_and_resume(tmp_path, data, length_reward, count_generations, monkeypatch):
    out = tmp_path / "out"
    base = _answers_file(tmp_path / "base.json", ["one", "one two three", "a b c d e f"])
    opts = _options(f"{length_reward}:reward", data, out, baseline=base)
    res = ev.run_reward_eval(opts)
    assert sum(count_generations) == 3 and res["n_prompts"] == 3
    saved = json.loads((out / "answers.json").read_text())
    assert [a["prompt"] for a in saved] == [r["prompt"] for r in ROWS]
    lengths = [len(a["output"].split()) for a in saved]
    m = res["model_stats"]
    assert m["mean_reward"] == pytest.approx(sum(lengths) / 3) and m["extras"] == {"has_row": 1.0}
    assert m["length_words"] == pytest.approx(sum(lengths) / 3)
    assert m["length_tokens"] == pytest.approx(sum(a["tokens"] for a in saved) / 3)
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(lengths, (1, 3, 6))) / 3
    assert res["win"]["win_rate"] == pytest.approx(expected)
    assert res["baseline_stats"]["mean_reward"] == pytest.approx(10 / 3)
    assert res["baseline_stats"]["length_tokens"] is None  # a file without token counts
    assert json.loads((out / "results.json").read_text())["win"] == res["win"]
    assert len(json.loads((out / "scores.json").read_text())) == 3

    # a rerun reuses every answer; a partial file is completed, not regenerated
    mtime = (out / "answers.json").stat().st_mtime_ns
    again = ev.run_reward_eval(opts)
    assert sum(count_generations) == 3 and (out / "answers.json").stat().st_mtime_ns == mtime
    assert again["model_stats"] == res["model_stats"]
    (out / "answers.json").write_text(json.dumps(saved[:1]))
    ev.run_reward_eval(opts)
    assert sum(count_generations) == 5
    assert json.loads((out / "answers.json").read_text())[0] == saved[0]
    with pytest.raises(ConfigError, match="other settings"):
        ev.run_reward_eval(_options(f"{length_reward}:reward", data, out, baseline=base, max_new_tokens=5))
    # the same model path with other weights (a run trained again): its old answers are dropped
    monkeypatch.setattr(ev, "weights_fingerprint", lambda *refs: [["adapter_model.safetensors", 2, 1]])
    ev.run_reward_eval(opts)
    assert sum(count_generations) == 8


def test_verifiable_reward_constraint_shares_for_model_and_baseline(tmp_path, data):
    # baseline answers with known constraint shares: 1/1, 1/2 (lowercase but a comma), 0/1
    base = _answers_file(tmp_path / "base.json", ["blue", "hi, there", "this has far too many words"])
    # the flat keywords of the command's flags make the same options (`RewardEvalOptions.from_kwargs`)
    res = ev.run_reward_eval(reward=VERIFIABLE, data=data, baseline=base, output_dir=str(tmp_path / "o"), **FAST)
    b = res["baseline_stats"]["extras"]
    assert b["constraints_satisfied"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert b["all_constraints_satisfied"] == pytest.approx(1 / 3)
    import importlib.util

    spec = importlib.util.spec_from_file_location("vr", ROOT / "examples" / "verifiable_reward.py")
    vr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vr)
    answers = [a["output"] for a in json.loads((tmp_path / "o" / "answers.json").read_text())]
    shares = [vr.constraint_score(a, r["constraints"]) for a, r in zip(answers, ROWS)]
    assert res["model_stats"]["extras"]["constraints_satisfied"] == pytest.approx(sum(shares) / 3)


def test_baseline_model_generates_into_its_own_folder(tmp_path, data, length_reward):
    out = tmp_path / "o"
    res = ev.run_reward_eval(_options(f"{length_reward}:reward", data, out, baseline="tiny-random", max_instances=2))
    assert (out / "baseline" / "answers.json").is_file() and res["n_prompts"] == 2
    # the same model, greedy: the same answers, all ties
    assert res["win"]["ties"] == 2 and res["win"]["win_rate"] == 0.5
    assert res["model_stats"]["mean_reward"] == res["baseline_stats"]["mean_reward"]


def test_the_default_baseline_is_the_base_of_a_run_or_adapter(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name_or_path: tiny-random\n")
    assert ev.base_model_of(str(run), None) == "tiny-random"
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert ev.base_model_of(None, str(lora)) == "org/base"
    assert ev.base_model_of("org/base", str(lora)) == "org/base"
    assert ev.base_model_of("tiny-random", None) is None
    assert ev.resolve_baseline(None, str(run), None).model == "tiny-random"
    assert ev.resolve_baseline("none", str(run), None) is None
    # answers of a retrained run in the same folder are not mistaken for the old ones
    (run / "adapter_model.safetensors").write_bytes(b"x")
    before = ev.weights_fingerprint(str(run))
    (run / "adapter_model.safetensors").write_bytes(b"xy")
    assert before and ev.weights_fingerprint(str(run)) != before


def test_prompts_from_the_row_layouts(tmp_path):
    f = tmp_path / "test.jsonl"
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "k": 1},
            {"prompt": [{"role": "user", "content": "c"}], "id": 2},
            {"chosen": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}],
             "rejected": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "f"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = ev.load_prompts(str(f), "test")
    assert [p.messages[-1]["content"] for p in got] == ["a", "c", "d"]
    assert got[0].extras == {"k": 1} and got[1].extras == {"id": 2} and got[2].reference == "e"
    f.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    with pytest.raises(DataError, match="row 1.*no prompt"):
        ev.load_prompts(str(f), "test")


def test_scores_are_reused_only_for_the_same_reward_prompt_and_answer(tmp_path, data, count_generations):
    calls = tmp_path / "calls.txt"
    src = ("from pathlib import Path\n"
           f"CALLS = Path({str(calls)!r})\n"
           "def reward(prompt, response, row):\n"
           "    with open(CALLS, 'a') as fh:\n        fh.write(response + '\\n')\n"
           "    return float(len(response))\n")
    fn = tmp_path / "counted.py"
    fn.write_text(src)
    out = tmp_path / "out"
    base = _answers_file(tmp_path / "base.json", ["one", "one two three", "a b c d e f"])
    run = lambda: ev.run_reward_eval(_options(f"{fn}:reward", data, out, baseline=base))  # noqa: E731
    n_calls = lambda: len(calls.read_text().splitlines()) if calls.exists() else 0  # noqa: E731
    first = run()
    assert (first["scores_new"], first["scores_reused"]) == (6, 0)
    assert n_calls() == 1 + 6  # the trial on the first row, then 3 answers of the model and 3 of the baseline
    again = run()
    assert (again["scores_new"], again["scores_reused"]) == (0, 6) and n_calls() == 7 + 1  # only the trial
    assert again["model_stats"] == first["model_stats"] and again["win"] == first["win"]
    # one baseline answer changed: only it is scored again
    base = _answers_file(tmp_path / "base.json", ["one", "one two three", "changed"])
    third = run()
    assert (third["scores_new"], third["scores_reused"]) == (1, 5) and n_calls() == 8 + 1 + 1
    assert third["baseline_stats"]["mean_reward"] == pytest.approx((3 + 13 + 7) / 3)
    # an edited reward is another reward: everything is scored again, the old scores are not used
    fn.write_text(src.replace("float(len(response))", "float(len(response)) + 100.0"))
    edited = run()
    assert (edited["scores_new"], edited["scores_reused"]) == (6, 0)
    assert edited["model_stats"]["mean_reward"] == pytest.approx(first["model_stats"]["mean_reward"] + 100)
    assert sum(count_generations) == 3  # the model's answers were generated once
    # the first reward again: its scores were kept in its own log, nothing is scored again
    fn.write_text(src)
    back = run()
    assert (back["scores_new"], back["scores_reused"]) == (0, 6)
    assert back["model_stats"] == third["model_stats"] and back["baseline_stats"] == third["baseline_stats"]
    assert len(list((out / "score_cache").glob("*.jsonl"))) == 2


def test_bad_input_fails_before_any_model_loads(tmp_path, data, length_reward, monkeypatch):
    def no_loading(self):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ChatGenerator, "load", no_loading)
    run = lambda reward, data, **kw: ev.run_reward_eval(_options(reward, data, tmp_path / "o", **kw))  # noqa: E731
    with pytest.raises(MissingSplitError, match="no file for split 'validation'"):
        run(f"{length_reward}:reward", data, split="validation")
    with pytest.raises(DataError, match="not found"):
        run(f"{length_reward}:reward", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="fails on the first row.*KeyError"):
        run(f"{length_reward}:broken", data)
    with pytest.raises(ConfigError, match="has no function"):
        run(f"{length_reward}:nope", data)
    with pytest.raises(DataError, match="no answer for 1 of the 3"):
        run(f"{length_reward}:reward", data, baseline=_answers_file(tmp_path / "short.json", ["a", "b"]))
    with pytest.raises(DataError, match="baseline answers not found"):
        run(f"{length_reward}:reward", data, baseline=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="invalid decoding"):
        run(f"{length_reward}:reward", data, max_new_tokens=0)
    with pytest.raises(SourceError, match="no-such-reward-model"):  # a reward model is resolved first, loaded last
        run(str(tmp_path / "no-such-reward-model"), data)


def test_a_reward_failing_on_generated_answers_is_a_clear_error(tmp_path, data):
    (tmp_path / "picky.py").write_text(
        "def reward(prompt, response, row):\n"
        "    if response in ('blue', 'hi there', 'yes indeed'):\n        return 1.0\n"
        "    raise ValueError('cannot score ' + repr(response[:10]))\n")
    with pytest.raises(ConfigError, match="failed while scoring the answers of tiny-random: ValueError"):
        ev.run_reward_eval(_options(f"{tmp_path / 'picky.py'}:reward", data, tmp_path / "o", baseline="none"))


def test_cli_prints_the_table_and_exits_2_on_errors(tmp_path, data):
    from alphadpo_cli.cli import main

    base = _answers_file(tmp_path / "base.json", ["blue", "hi, there", "far too many words here"])
    args = ["eval", "reward", "-m", "tiny-random", "--data", data, "--reward", VERIFIABLE, "--baseline", base,
            "--max-new-tokens", "4", "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "constraints satisfied" in r.output and "win rate vs base" in r.output and "mean reward ± SE" in r.output
    r = CliRunner().invoke(main, args + ["--split", "nope"])
    assert r.exit_code == 2 and "Traceback" not in r.output


# --- unusable scores and long inputs ----------------------------------------------------------


def test_a_reward_returning_nan_is_an_error_naming_the_row_not_a_nan_mean(tmp_path, data):
    from alphadpo_cli.cli import main

    (tmp_path / "nan_reward.py").write_text("def reward(prompt, response, row):\n    return float('nan')\n")
    base = _answers_file(tmp_path / "base.json", ["blue", "hi there", "yes"])
    args = ["eval", "reward", "-m", "tiny-random", "--data", data, "--reward", f"{tmp_path / 'nan_reward.py'}:reward",
            "--baseline", base, "--max-new-tokens", "4", "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "nan_reward.py:reward" in text and "returned nan" in text and "test.jsonl, row 1" in text
    assert "Name a colour" in text and "mean reward" not in text and "Traceback" not in r.output
    # a reward that is fine on the row's own answer but not on a generated one: the same error, that row
    (tmp_path / "late_nan.py").write_text(
        "def reward(prompt, response, row):\n    return float('inf') if response == 'yes' else 1.0\n")
    with pytest.raises(ConfigError, match=r"late_nan.py:reward' returned inf for .*test.jsonl, row 3 .line 3., the answer of base"):
        ev.run_reward_eval(_options(f"{tmp_path / 'late_nan.py'}:reward", data, tmp_path / "o2", baseline=base))


@pytest.fixture
def reward_model(tmp_path):
    """A tiny sequence-classification reward model whose embedding of the byte 'Â' (the first byte
    of '§') is NaN: any input holding '§' scores NaN, a reward model failing on an item."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alphadpo_cli.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    bad = tok("§", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("nan")
    out = tmp_path / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


def test_a_reward_model_reports_cut_inputs_and_leaves_out_what_it_cannot_score(tmp_path, data, reward_model):
    from rich.console import Console

    rm, tok = reward_model
    # the baseline's second answer holds '§': the reward model gives NaN there
    base = _answers_file(tmp_path / "base.json", ["blue", "hi § there", "yes indeed"])
    run = lambda: ev.run_reward_eval(_options(str(rm), data, tmp_path / "o", baseline=base,  # noqa: E731
                                              reward_max_length=60))
    res = run()
    answers = {r["key"]: r["output"] for r in json.loads((tmp_path / "o" / "answers.json").read_text())}
    prompts = ev.load_prompts(data, "test")

    def length(messages, output):
        text = tok.apply_chat_template([*messages, {"role": "assistant", "content": output}], tokenize=False)
        return len(tok(text, add_special_tokens=False).input_ids)

    mine_cut = sum(length(p.messages, answers[p.key]) > 60 for p in prompts)
    base_cut = sum(length(p.messages, o) > 60 for p, o in zip(prompts, ["blue", "hi § there", "yes indeed"]))
    assert 0 < base_cut < 3 and 0 < mine_cut < 3  # the first two prompts are longer than 60 byte tokens
    m, b = res["model_stats"], res["baseline_stats"]
    assert (m["reward_input_cut"], b["reward_input_cut"]) == (mine_cut, base_cut)
    assert (m["unscored"], b["unscored"], m["n"], b["n"]) == (0, 1, 3, 2)
    assert math.isfinite(b["mean_reward"]) and math.isfinite(m["mean_reward"])
    per = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert per[1]["baseline_score"] is None and "nan" in per[1]["baseline_unscored"]
    assert b["mean_reward"] == pytest.approx((per[0]["baseline_score"] + per[2]["baseline_score"]) / 2)
    win = res["win"]
    assert win["excluded"] == 1 and win["wins"] + win["ties"] + win["losses"] == 2
    console = Console(record=True, width=200)
    ev.print_result(res, console)
    table = console.export_text()
    assert "answers cut to the reward model's max length" in table and "could not score (left out)" in table
    assert "left out of the win rate" in table
    # the saved scores (the failure included) are reused as they are
    again = run()
    assert again["scores_new"] == 0 and again["baseline_stats"] == b


def test_cli_passes_reward_max_length_on(monkeypatch, tmp_path, data):
    """`--reward-max-length` reaches run_reward_eval (default 4096, as data build's)."""
    from alphadpo_cli.cli import main

    seen = []

    def fake_run(options=None, *, console=None, **kw):  # the options object, or the flat keywords of before
        seen.append(options or ev.RewardEvalOptions.from_kwargs(**kw))
        return {}

    monkeypatch.setattr(ev, "run_reward_eval", fake_run)
    monkeypatch.setattr(ev, "print_result", lambda result, console: None)
    args = ["eval", "reward", "-m", "tiny-random", "--data", data, "--reward", VERIFIABLE, "-o", str(tmp_path / "o")]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, args + ["--reward-max-length", "512"]).exit_code == 0
    assert [o.reward.max_length for o in seen] == [4096, 512]


# --- the options object and the score logs ----------------------------------------------------


def test_flat_keywords_make_the_same_options():
    flat = ev.RewardEvalOptions.from_kwargs(reward="r.py:f", data="d", split="s", model="m", adapter="a", preset="p",
                                            baseline="none", name="n", output_dir="o", max_instances=3,
                                            temperature=0.5, top_p=0.9, max_new_tokens=7, batch_size=2, seed=1,
                                            backend="transformers", dtype="fp32", overwrite=True, reward_batch_size=4,
                                            reward_max_length=64, trust_remote_code=True, quiet=True)
    assert flat == ev.RewardEvalOptions(
        reward=RewardOptions("r.py:f", batch_size=4, max_length=64, trust_remote_code=True), data="d", split="s",
        model=ModelSpec("m", adapter="a", preset="p", dtype="fp32", backend="transformers"), baseline="none",
        decoding=DecodingOptions(temperature=0.5, top_p=0.9, max_new_tokens=7, batch_size=2, seed=1),
        output=OutputOptions(output_dir="o", name="n", overwrite=True, quiet=True), max_instances=3)
    assert ev.RewardEvalOptions.from_kwargs(reward="r.py:f", data="d") == ev.RewardEvalOptions(RewardOptions("r.py:f"), "d")
    with pytest.raises(TypeError, match="unexpected keyword argument 'reward_dtyp'"):
        ev.RewardEvalOptions.from_kwargs(reward="r.py:f", data="d", reward_dtyp="x")
    with pytest.raises(TypeError, match="not both"):
        ev.run_reward_eval(flat, data="other")


def test_a_score_log_per_reward_and_the_single_log_of_before_is_adopted(tmp_path, data, length_reward):
    from alphadpo_cli.artefacts import FORMAT
    from alphadpo_cli.rewards.identity import identity_hash, reward_identity

    out = tmp_path / "out"
    spec = f"{length_reward}:reward"
    base = _answers_file(tmp_path / "base.json", ["one", "one two three", "a b c d e f"])
    first = ev.run_reward_eval(_options(spec, data, out, baseline=base))
    identity = reward_identity(spec, max_length=4096)
    (log,) = (out / "score_cache").glob("*.jsonl")
    header, *records = [json.loads(x) for x in log.read_text().splitlines()]
    assert log.name == f"{identity_hash(identity)[:16]}.jsonl"
    assert header["format"] == FORMAT and header["identity"] == json.loads(json.dumps(identity))
    assert len(records) == first["scores_new"] == 6
    # the single header-less log of earlier versions: every reward's records, a reward hash in each
    other = [{**r, "reward": "another reward", "score": -1.0} for r in records]
    legacy = "".join(json.dumps(r) + "\n" for r in [*other, *({**r, "reward": identity_hash(identity)} for r in records)])
    (out / "score_cache.jsonl").write_text(legacy)
    log.unlink()
    again = ev.run_reward_eval(_options(spec, data, out, baseline=base))
    assert (again["scores_new"], again["scores_reused"]) == (0, 6)  # its scores are this reward's, not the other's
    assert again["model_stats"] == first["model_stats"] and again["baseline_stats"] == first["baseline_stats"]
    assert [json.loads(x) for x in log.read_text().splitlines()][1:] == records  # copied into its log
    assert (out / "score_cache.jsonl").read_text() == legacy  # the old file is only read
    # a damaged log names the file and the line
    log.write_text(log.read_text().replace(json.dumps(records[0]), "{not json", 1))
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        ev.run_reward_eval(_options(spec, data, out, baseline=base))
