"""Arena-Hard v0.1: verdict parsing, battle weighting, Bradley-Terry score, and the whole run on
the tiny model against a real HTTP judge on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from alphadpo_cli.data import DataError
from alphadpo_cli.evaluation import arenahard as ah
from alphadpo_cli.evaluation import evaluate

FIX = Path(__file__).resolve().parent / "fixtures" / "eval"
QUESTIONS, BASELINE = FIX / "arena_questions.jsonl", FIX / "arena_baseline.jsonl"

_spec = importlib.util.spec_from_file_location("eval_judge_server", FIX / "judge_server.py")
judge_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(judge_server)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("text,expected", [
    ("... My final verdict is: [[A>>B]]", ("A>>B", False)),
    ("[[B>A]] and again [[B>A]]", ("B>A", False)),
    ("first [[A>B]] then [[B>A]]", (None, False)),
    ("no label here", (None, True)),
    ("[[A=B]]", ("A=B", False)),
])
def test_verdict_parsing(text, expected):
    assert ah.parse_verdict(text) == expected


def test_battles_weight_strong_verdicts_and_swap_game_two():
    games = [{"game": 0, "score": "A>>B"}, {"game": 1, "score": "A>>B"}, {"game": 0, "score": "B>A"},
             {"game": 1, "score": "A=B"}, {"game": 0, "score": None}, {"game": 1, "score": "weird"}]
    b = ah.battles_from_games(games)
    assert b.count("baseline") == 3 and b.count("model") == 3 + 1 and b.count("tie") == 1 and len(b) == 8


def test_bradley_terry_two_players():
    assert ah.bt_win_rate(["model"] * 3 + ["baseline"]) == pytest.approx(0.75)
    assert ah.bt_win_rate(["tie"] * 4) == pytest.approx(0.5)
    assert ah.bt_win_rate(["model", "tie"]) == pytest.approx(0.75)
    assert ah.elo_from_win_rate(0.5) == pytest.approx(1000)
    assert ah.elo_from_win_rate(10 / 11) == pytest.approx(1400)
    lo, hi = ah.bootstrap_interval(["model"] * 30 + ["baseline"] * 10, rounds=200)
    assert lo < 0.75 < hi and ah.bootstrap_interval(["model"] * 30 + ["baseline"] * 10, rounds=200) == (lo, hi)


def test_official_prompt_shape():
    user = ah.PROMPT_TEMPLATE.format(question_1="Q", answer_1="a1", answer_2="a2")
    assert user.startswith("<|User Prompt|>\nQ\n\n<|The Start of Assistant A's Answer|>\na1\n")
    assert "[[A>>B]]" in ah.SYSTEM_PROMPT and ah.SYSTEM_PROMPT.startswith("Please act as an impartial judge")


def test_end_to_end_with_http_judge(tmp_path):
    out = tmp_path / "ah"
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(429, {"Retry-After": "0"}), (503, {})])
        res = evaluate("arena-hard", model="tiny-random", questions=str(QUESTIONS), baseline=str(BASELINE),
                       max_new_tokens=8, output_dir=str(out), judge_base_url=srv.url, judge_model="stub",
                       judge_backoff=0.01, bootstrap_rounds=50, quiet=True)
        n_requests = len(srv.requests)
    answers = [json.loads(x) for x in (out / "model_answer.jsonl").read_text().splitlines()]
    assert {a["question_id"] for a in answers} == {"q0001", "q0002", "q0003", "q0004"}
    assert all(a["model_id"] == "tiny-random" and "token_len" in a["choices"][0]["turns"][0] for a in answers)
    # 8 games; NOVERDICT needs a continuation turn in both games; MALFORMED tries twice in both; +2 retried.
    assert n_requests == 8 + 2 + 2 + 2
    judgments = [json.loads(x) for x in (out / "model_judgment.jsonl").read_text().splitlines()]
    assert len(judgments) == 4 and all(len(j["games"]) == 2 for j in judgments)
    by_q = {j["question_id"]: j for j in judgments}
    g1, g2 = by_q["q0001"]["games"]
    assert "A>>B" == g1["score"] and g2["score"] == "B>>A"  # long baseline vs short model, positions swapped
    assert "<|The Start of Assistant A's Answer|>\nA hash table" in g1["user_prompt"]
    assert "<|The Start of Assistant B's Answer|>\nA hash table" in g2["user_prompt"]
    assert by_q["q0003"]["games"][0]["score"] is not None  # the continuation found the verdict
    assert by_q["q0004"]["games"][0]["score"] is None
    assert res["n_malformed"] == 2 and res["games_judged"] == 8 and res["n_failed"] == 0
    # Expected score from the stub's verdicts.
    games = [{"game": i, "score": g["score"]} for j in judgments for i, g in enumerate(j["games"])]
    assert res["score"] == pytest.approx(ah.bt_win_rate(ah.battles_from_games(games)) * 100)
    assert res["ci_lower"] <= res["score"] <= res["ci_upper"]

    with judge_server.JudgeServer() as srv:  # everything cached: nothing generated, nothing judged
        res2 = evaluate("arena-hard", model="tiny-random", questions=str(QUESTIONS), baseline=str(BASELINE),
                        max_new_tokens=8, output_dir=str(out), judge_base_url=srv.url, judge_model="stub", quiet=True)
        assert srv.requests == []
    assert res2["score"] == pytest.approx(res["score"])


def test_answers_file_and_missing_baseline(tmp_path):
    ans = tmp_path / "mine.jsonl"
    ans.write_text("".join(json.dumps({"question_id": q, "choices": [{"index": 0, "turns": [{"content": "x" * 400}]}]}) + "\n"
                           for q in ("q0001", "q0002", "q0003", "q0004")))
    with judge_server.JudgeServer() as srv:
        res = evaluate("arena-hard", answers=str(ans), questions=str(QUESTIONS), baseline=str(BASELINE),
                       output_dir=str(tmp_path / "o"), judge_base_url=srv.url, judge_model="stub", max_instances=2,
                       quiet=True)
    assert res["n_questions"] == 2 and res["score"] > 50  # long answers beat the short baseline with this judge
    short = tmp_path / "b.jsonl"
    short.write_text(BASELINE.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no baseline answer"):
        evaluate("arena-hard", answers=str(ans), questions=str(QUESTIONS), baseline=str(short),
                 output_dir=str(tmp_path / "o2"), judge_base_url="http://127.0.0.1:9/v1", judge_model="stub", quiet=True)


def test_offline_download_error_is_clear(tmp_path):
    with pytest.raises(DataError, match="--questions PATH"):
        evaluate("arena-hard", model="tiny-random", output_dir=str(tmp_path), judge=False, quiet=True)
