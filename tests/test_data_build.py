"""`alphadpo data build`: binarisation by hand, prompt layouts and bad rows, the dataset training
reads, resuming without redoing batches, shards merging to the one-process build, and the demo
builder at toy size. The policy is the tiny random model, the rewards small Python functions."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from alphadpo_cli.artefacts import FORMAT
from alphadpo_cli.cli import main
from alphadpo_cli.config import ConfigError, DataConfig
from alphadpo_cli.data import DataError
from alphadpo_cli.rewards.build import (BuildOptions, Candidate, binarise, build_dataset, gpu_for_shard,
                                        resolve_decoding, shard_from_env)

ROOT = Path(__file__).resolve().parent.parent
VERIFIABLE = f"{ROOT / 'examples' / 'verifiable_reward.py'}:reward"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# binarisation by hand


def C(text, score, finished=True):
    return Candidate(text, score, finished)


def test_best_worst_takes_the_best_finished_and_the_worst_other():
    pairs, drops = binarise([C("a", 0.2), C("b", 0.9), C("c", 0.1), C("d", 0.9), C("e", 1.5, finished=False)])
    assert [(p.text, q.text) for p, q in pairs] == [("b", "c")] and not drops  # first of equal best; cut-off e not chosen
    pairs, _ = binarise([C("a", 0.2), C("e", 1.5, finished=False)], chosen_must_finish=False)
    assert [(p.text, q.text) for p, q in pairs] == [("e", "a")]


def test_ties_identical_and_the_rest_are_dropped_and_counted():
    cases = [
        ([C("same", 1.0), C("same", 0.5)], "identical"),
        ([C("a", 0.5), C("b", 0.5)], "tie"),
        ([C("a", 0.6), C("b", 0.5)], "small_gap"),  # min_gap 0.2 below
        ([C("a", 0.1), C("b", 0.9, finished=False)], "unfinished_chosen"),
        ([C("a", 0.1, False), C("b", 0.9, False)], "no_finished_answer"),
        ([C("a", 1.0), C("  ", 0.0), C("", 0.0)], "too_few_answers"),
    ]
    for cands, reason in cases:
        pairs, drops = binarise(cands, min_gap=0.2 if reason == "small_gap" else 0.0)
        assert pairs == [] and drops == Counter({reason: 1}), (cands, drops)


def test_all_pairs_counts_every_pair_it_drops():
    cands = [C("a", 3.0), C("b", 1.0), C("c", 1.0), C("a", 2.0), C("d", 5.0, finished=False)]
    pairs, drops = binarise(cands, "all-pairs")
    assert sorted((p.text, q.text) for p, q in pairs) == [("a", "b"), ("a", "b"), ("a", "c"), ("a", "c")]
    # b-c tie; a-a identical; d beats everyone but was cut off
    assert drops == Counter({"tie": 1, "identical": 1, "unfinished_chosen": 4})
    assert len(pairs) + sum(drops.values()) == 10


def test_best_random_is_seeded_and_never_the_best_itself():
    cands = [C(f"t{i}", float(i)) for i in range(6)]
    got = [binarise(cands, "best-random", rng=random.Random(s))[0][0] for s in range(30)]
    assert all(c.text == "t5" and r.text != "t5" for c, r in got)
    assert len({r.text for _, r in got}) > 2  # really random
    assert binarise(cands, "best-random", rng=random.Random(3)) == binarise(cands, "best-random", rng=random.Random(3))
    # the random other may tie with the best: dropped as a tie
    _, drops = binarise([C("a", 1.0), C("b", 1.0)], "best-random", rng=random.Random(0))
    assert drops == Counter({"tie": 1})


# ---------------------------------------------------------------------------------------------
# prompts


def test_bad_rows_name_file_row_and_field_before_any_model_loads(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "no prompt here"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user"}]}) + "\n" + json.dumps({"prompt": "   "}) + "\n")
    r = CliRunner().invoke(main, ["data", "build", "-d", str(data), "-m", str(tmp_path / "no-such-model"), "-r", VERIFIABLE,
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "3 row(s) without a usable prompt" in text and "Traceback" not in r.output
    assert f"{data}, row 2 (line 2): no prompt" in text and "found columns: question" in text
    assert "row 3 (line 3): field 'prompt[0]' has no 'content'" in text
    assert "row 4 (line 4): field 'prompt' is empty" in text
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="no field 'instruction'"):
        build_dataset(BuildOptions(str(data), str(tmp_path / "o"), model="tiny-random", reward=VERIFIABLE,
                                   prompt_field="instruction"), generator=object())


# ---------------------------------------------------------------------------------------------
# builds on the tiny model


@pytest.fixture
def prompts(tmp_path):
    """Prompt files of every layout, and a small reward with ties, in a module of tmp_path."""
    rows = [{"prompt": f"Question {i}: why?", "topic": f"t{i % 3}"} for i in range(8)]
    rows += [{"messages": [{"role": "user", "content": f"Chat {i}"}, {"role": "assistant", "content": "old"}]}
             for i in range(3)]
    rows += [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Last one"}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy_reward.py").write_text(
        "CALLS = []\n"
        "def reward(prompt, response, row):\n"
        "    CALLS.append(1)\n"
        "    return {'score': float(sum(map(ord, response)) % 5), 'long': float(len(response) > 10)}\n")
    return tmp_path


def _opts(tmp, out="out", **kw):
    base = dict(dataset=str(tmp / "prompts.jsonl"), output_dir=str(tmp / out), model="tiny-random",
                reward=f"{tmp / 'toy_reward.py'}:reward", num_samples=3, max_new_tokens=6, batch_size=3,
                test_size=3, seed=1, backend="transformers", chosen_must_finish=False)
    base.update(kw)
    return BuildOptions(**base)


class Counting:
    """A real ChatGenerator, counting its sample calls."""

    def __init__(self, opts):
        from alphadpo_cli.evaluation.generate import ChatGenerator

        decoding, model, template = resolve_decoding(opts)
        self.inner = ChatGenerator(model, decoding=decoding, backend="transformers", chat_template=template)
        self.backend, self.decoding, self.calls = "transformers", decoding, []

    def load(self):
        self.inner.load()

    def sample(self, batch, n, seed_key=""):
        self.calls.append(seed_key)
        return self.inner.sample(batch, n, seed_key)


def _files(out: Path) -> dict[str, str]:
    return {n: (out / n).read_text() for n in ("train.jsonl", "test.jsonl") if (out / n).exists()}


def test_cli_build_writes_what_training_reads(prompts, tok):
    from alphadpo_cli.data import load_splits

    out = prompts / "out"
    r = CliRunner().invoke(main, ["data", "build", "-d", str(prompts / "prompts.jsonl"), "-m", "tiny-random",
                                  "-r", f"{prompts / 'toy_reward.py'}:reward", "-o", str(out), "-n", "4",
                                  "--max-new-tokens", "6", "--batch-size", "4", "--test-size", "3",
                                  "--allow-unfinished-chosen", "--keep-all", "--backend", "transformers"])
    assert r.exit_code == 0, r.output
    assert "score gap mean" in r.output and "tokens chosen / rejected" in r.output
    rec = json.loads((out / "build.json").read_text())
    assert rec["decoding"]["temperature"] == 0.8 and rec["decoding"]["top_p"] == 0.95  # the SimPO recipe
    assert rec["num_samples"] == 4 and rec["strategy"] == "best-worst" and rec["reward"]["function"] == "toy_reward.py:reward"
    train, test = rec["splits"]["train"], rec["splits"]["test"]
    assert (train["prompts"], test["prompts"], train["answers"]) == (9, 3, 36)
    for s in (train, test):  # every prompt gives a pair or a counted reason
        assert s["prompts_with_pair"] + sum(s["dropped"].values()) == s["prompts"]
    assert rec["throughput"]["tokens_per_s"] > 0 and set(rec["versions"]) >= {"alphadpo", "torch", "transformers"}
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == train["pairs"] > 0
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"] and row["chosen"][-1] != row["rejected"][-1]
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1]["role"] == "assistant"
        assert len(row["all_generated_responses"]) == 4 == len(row["all_rm_scores"])
        if isinstance(row["prompt"], list):  # a system turn: the prompt is its messages
            assert row["chosen"][:-1] == row["prompt"] and row["prompt"][0]["role"] == "system"
        else:
            assert row["chosen"][:-1] == [{"role": "user", "content": row["prompt"]}]
    assert any(r.get("topic") for r in rows)  # the source rows' other fields are kept
    # the directory is a dataset as training reads it (the work dir and build.json are not data)
    tr, ev = load_splits(DataConfig(dataset=str(out)), tok, use_cache=False)
    assert len(tr.dataset) == len(rows) and len(ev.dataset) == test["pairs"]


def test_resume_redoes_no_finished_batch_and_refuses_other_settings(prompts):
    opts = _opts(prompts)
    gen = Counting(opts)
    first = build_dataset(_opts(prompts, max_batches=2), generator=gen, quiet=True)
    assert not first.complete and first.generated == 2 and gen.calls == ["train/0", "train/1"]
    log = prompts / "out" / ".work" / "answers.0-of-1.jsonl"
    with open(log, "a") as fh:  # killed while writing the next batch
        fh.write('{"id": "train/2", "hash": "')
    done = build_dataset(opts, generator=gen, quiet=True)
    assert done.complete and gen.calls == ["train/0", "train/1", "train/2", "test/0"]
    once = Counting(opts)
    fresh = build_dataset(_opts(prompts, "fresh"), generator=once, quiet=True)
    assert _files(prompts / "out") == _files(prompts / "fresh") and fresh.record["splits"] == done.record["splits"]
    again = build_dataset(opts, generator=gen, quiet=True)  # nothing left to do
    assert again.complete and again.generated == again.scored == 0 and len(gen.calls) == 4
    with pytest.raises(ConfigError, match=r"other settings \(decoding.temperature: 0.8 there, 0.5 now\)"):
        build_dataset(_opts(prompts, temperature=0.5), quiet=True)
    (prompts / "other_reward.py").write_text("def reward(prompt, response, row):\n    return -len(response)\n")
    with pytest.raises(ConfigError, match="another reward.*--rescore"):
        build_dataset(_opts(prompts, reward=f"{prompts / 'other_reward.py'}:reward"), generator=gen, quiet=True)
    rescored = build_dataset(_opts(prompts, reward=f"{prompts / 'other_reward.py'}:reward", rescore=True,
                                   strategy="all-pairs"), generator=gen, quiet=True)
    assert rescored.complete and rescored.scored == 4 and len(gen.calls) == 4  # new scores, the same answers
    row = json.loads((prompts / "out" / "train.jsonl").read_text().splitlines()[0])
    assert row["score_chosen"] == -len(row["chosen"][-1]["content"])


def test_two_shards_merge_to_the_one_process_build(prompts, monkeypatch):
    opts = _opts(prompts)
    gen = Counting(opts)
    single = build_dataset(_opts(prompts, "single"), generator=gen, quiet=True)
    calls = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        if rank == 1:
            with pytest.raises(ConfigError, match="cannot merge.*2 of 4 batches"):
                build_dataset(_opts(prompts, merge_only=True), generator=gen, quiet=True)
        g = Counting(opts)
        summary = build_dataset(opts, generator=g, quiet=True)
        calls[rank] = g.calls
        assert summary.complete is (rank == 1) and summary.world == 2
    assert calls == {0: ["train/0", "train/2"], 1: ["train/1", "test/0"]}
    work = prompts / "out" / ".work"
    assert sorted(p.name for p in work.glob("*.jsonl")) == [f"{k}.{r}-of-2.jsonl" for k in ("answers", "scores") for r in (0, 1)]
    assert _files(prompts / "out") == _files(prompts / "single") and single.complete
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    merged = build_dataset(_opts(prompts, merge_only=True), generator=gen, quiet=True)  # --merge in one process
    assert merged.complete and _files(prompts / "out") == _files(prompts / "single")


def test_shard_and_gpu_from_the_environment():
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)
    assert shard_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (1, 2)
    with pytest.raises(ConfigError):
        shard_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert gpu_for_shard({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == "1"
    assert gpu_for_shard({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5"}) == "5"
    assert gpu_for_shard({"LOCAL_RANK": "0", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "3"}) is None
    assert gpu_for_shard({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}) is None


# ---------------------------------------------------------------------------------------------
# the demo builder


def test_the_demo_builder_is_a_call_of_the_build_at_toy_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("build_demo_dataset_toy", ROOT / "examples" / "build_demo_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vr = sys.modules["verifiable_reward"]
    out = tmp_path / "demo"
    assert module.main(["--model", "tiny-random", "--out", str(out), "--limit", "4", "--k", "3", "--per-topic", "1",
                        "--test-topics", "5", "--max-new-tokens", "24", "--batch-prompts", "4", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    rec = json.loads((out / "build.json").read_text())
    assert rec["splits"]["train"]["prompts"] == summary["train"]["prompts"] == 4 and rec["num_samples"] == 3
    assert rec["decoding"] == {"max_new_tokens": 24, "seed": 0, "stop_token_ids": [], "temperature": 0.9, "top_p": 1.0}
    assert rec["chosen_must_finish"] and rec["reward"]["function"] == "verifiable_reward.py:reward"
    rows = [json.loads(line) for f in ("train.jsonl", "test.jsonl") if (out / f).exists()
            for line in (out / f).read_text().splitlines()]
    assert len(rows) == summary["train"]["pairs"] + summary["test"]["pairs"] > 0
    for row in rows:  # the shipped demo rows' format, and their scores are the reward
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "constraints"}
        assert row["score_chosen"] == round(vr.score_response(row["chosen"][1]["content"], row["constraints"],
                                                              finished=True, prompt=row["prompt"]), 4)


def test_torchrun_two_processes_build_what_one_process_builds(prompts):
    """The launch the docs show (`torchrun --nproc-per-node N -m alphadpo_cli.cli data build ...`),
    on 127.0.0.1 with two CPU processes: each samples and scores its own batches, and the dataset
    equals a one-process build's, byte for byte."""
    import os
    import subprocess

    from helpers import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    args = ["-m", "alphadpo_cli.cli", "data", "build", "-d", str(prompts / "prompts.jsonl"), "-m", "tiny-random",
            "-r", f"{prompts / 'toy_reward.py'}:reward", "-n", "3", "--max-new-tokens", "6", "--batch-size", "3",
            "--test-size", "3", "--seed", "1", "--backend", "transformers", "--allow-unfinished-chosen"]
    one = subprocess.run([sys.executable, *args, "-o", str(prompts / "one")], env=env, cwd=prompts,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args,
                          "-o", str(prompts / "two")], env=env, cwd=prompts, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    said = two.stdout + two.stderr
    assert "shard 0 of 2" in said and "shard 1 of 2" in said, said[-3000:]
    work = prompts / "two" / ".work"
    assert sorted(p.name for p in work.glob("answers.*.jsonl")) == ["answers.0-of-2.jsonl", "answers.1-of-2.jsonl"]
    logs = {r: [json.loads(line) for line in (work / f"answers.{r}-of-2.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert all(log[0]["format"] == FORMAT and log[0]["kind"] == "data build answers" for log in logs.values())
    ids = {r: [rec["id"] for rec in log[1:]] for r, log in logs.items()}  # after each work log's header
    assert ids == {0: ["train/0", "train/2"], 1: ["train/1", "test/0"]}  # every other batch
    assert _files(prompts / "two") == _files(prompts / "one") and _files(prompts / "one")
    rec = json.loads((prompts / "two" / "build.json").read_text())
    assert rec["shards"] == 2 and rec["splits"] == json.loads((prompts / "one" / "build.json").read_text())["splits"]


# ---------------------------------------------------------------------------------------------
# unusable scores, long inputs


class Fixed:
    """A generator with fixed answers (no model): the same `texts` for every prompt."""

    backend = "custom"

    def __init__(self, texts):
        self.texts = texts

    def sample(self, batch, n, seed_key=""):
        from alphadpo_cli.evaluation.generate import Answer

        return [[Answer(t, len(t), "stop") for t in self.texts[:n]] for _ in batch]


def test_a_function_reward_returning_nan_stops_the_build_naming_the_row(prompts):
    (prompts / "nan_reward.py").write_text(
        "def reward(prompt, response, row):\n    return float('nan') if response == 'two' else 1.0\n")
    opts = _opts(prompts, reward=f"{prompts / 'nan_reward.py'}:reward", test_size=None)
    with pytest.raises(ConfigError) as err:
        build_dataset(opts, generator=Fixed(["one", "two", "three"]), quiet=True)
    msg = str(err.value)
    assert "nan_reward.py:reward" in msg and "returned nan" in msg
    assert "prompts.jsonl, row 1 (line 1), answer 2" in msg and "Question 0: why?" in msg
    (prompts / "nan_extra.py").write_text(
        "def reward(prompt, response, row):\n    return {'score': 1.0, 'share': float('nan')}\n")
    with pytest.raises(ConfigError, match=r"nan_extra.py:reward' returned share=nan for .*row 1 \(line 1\), answer 1"):
        build_dataset(_opts(prompts, "o2", reward=f"{prompts / 'nan_extra.py'}:reward", test_size=None),
                      generator=Fixed(["one", "two", "three"]), quiet=True)


def test_answers_a_reward_model_cannot_score_take_no_part_and_are_counted(prompts):
    import math

    from rich.console import Console

    from alphadpo_cli.rewards import Reward, Scored
    from alphadpo_cli.rewards.build import print_summary

    class FlakyModel(Reward):
        """Scores by length; NaN (failed) on answers holding 'bad', input cut on those holding 'long'."""

        name = "flaky-reward-model"

        def score(self, items):
            return [Scored(math.nan, failed="the reward model's output is nan") if "bad" in it.response
                    else Scored(float(len(it.response)), cut="long" in it.response) for it in items]

    texts = ["a", "bad bad bad bad", "ccc long", "dddd"]  # the longest, the would-be best, cannot be scored
    summary = build_dataset(_opts(prompts, reward=None, num_samples=4, keep_all=True), generator=Fixed(texts),
                            reward=FlakyModel(), quiet=True)
    assert summary.complete
    splits = summary.record["splits"]
    for s in splits.values():
        assert s["unscored_answers"] == s["prompts"] and s["reward_input_cut"] == s["prompts"]
        assert s["pairs"] == s["prompts"]
    rows = [json.loads(line) for line in (prompts / "out" / "train.jsonl").read_text().splitlines()]
    # the best scored answer against the worst: the unscored one is neither
    assert {(r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in rows} == {("ccc long", "a")}
    assert rows[0]["all_rm_scores"] == [1.0, None, 8.0, 4.0]
    # binarised by hand the same way: the unscored candidate left out
    assert binarise([C("a", 1.0), Candidate("bad bad bad bad", None), C("ccc long", 8.0), C("dddd", 4.0)])[0] == \
        [(C("ccc long", 8.0), C("a", 1.0))]
    console = Console(record=True, width=200)
    print_summary(summary, console)
    table = console.export_text()
    assert "answers the reward model could not score (left out)" in table
    assert "answers cut to the reward model's max length" in table


# ---------------------------------------------------------------------------------------------
# the work directory's logs


class CountingFixed(Fixed):
    def __init__(self, texts):
        super().__init__(texts)
        self.calls = []

    def sample(self, batch, n, seed_key=""):
        self.calls.append(seed_key)
        return super().sample(batch, n, seed_key)


def test_work_logs_carry_the_work_dirs_identity_and_logs_from_before_headers_are_kept(prompts):
    from alphadpo_cli.artefacts import read_lines

    opts, texts = _opts(prompts, test_size=None), ["one", "two!", "three"]
    first = build_dataset(opts, generator=CountingFixed(texts), quiet=True)
    built, work = _files(prompts / "out"), prompts / "out" / ".work"
    identity = json.loads((work / "identity.json").read_text())
    logs = {k: work / f"{k}.0-of-1.jsonl" for k in ("answers", "scores")}
    answers, scores = (read_lines(logs[k]) for k in ("answers", "scores"))
    assert answers[0]["identity"] == identity["answers"] and answers[0]["format"] == FORMAT
    assert scores[0]["identity"] == {"answers": identity["answers"], "reward": identity["reward"]}
    assert [r["id"] for r in answers[1:]] == ["train/0", "train/1", "train/2", "train/3"] == [r["id"] for r in scores[1:]]
    for k, recs in (("answers", answers), ("scores", scores)):  # as written before headers, the last batch not done
        logs[k].write_text("".join(json.dumps(r) + "\n" for r in recs[1:-1]))
    gen = CountingFixed(texts)
    again = build_dataset(opts, generator=gen, quiet=True)
    assert again.complete and gen.calls == ["train/3"] and again.scored == 1 and _files(prompts / "out") == built
    assert again.record["splits"] == first.record["splits"]
    assert read_lines(logs["answers"])[0]["identity"] == identity["answers"]  # adopted: the header put in front
    # a scores log from before headers is started again by --rescore like any other
    logs["scores"].write_text("".join(json.dumps(r) + "\n" for r in read_lines(logs["scores"])[1:]))
    (prompts / "neg.py").write_text("def reward(prompt, response, row):\n    return -len(response)\n")
    rescored = build_dataset(_opts(prompts, test_size=None, reward=f"{prompts / 'neg.py'}:reward", rescore=True),
                             generator=gen, quiet=True)
    assert rescored.scored == 4 and len(gen.calls) == 1
    assert json.loads((prompts / "out" / "train.jsonl").read_text().splitlines()[0])["score_chosen"] == -3
    # without identity.json the logs' headers tell: other settings are refused, naming the log
    (work / "identity.json").unlink()
    with pytest.raises(ConfigError, match=r"answers.0-of-1.jsonl \(data build answers\) was written with other "
                                          r"settings \(decoding.max_new_tokens: 6 there, 7 now\); pass --overwrite"):
        build_dataset(_opts(prompts, test_size=None, max_new_tokens=7), generator=gen, quiet=True)
    assert not (work / "identity.json").exists() and len(gen.calls) == 1
