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


# --------------------------------------------------------------------------------------------
# files other tools read: model_judgment.jsonl as arena-hard-auto v0.1's show_result.py reads it


def official_battles(path: Path, weight: int = 3) -> list[str]:
    """show_result.py's get_battles_from_judgment, row handling only: each question's two games,
    `game["score"]` looked up (so a game that is not a dict crashes it), strong verdicts `weight`
    times, any other score (None included) weight 0. Winners as ours: model / baseline / tie."""
    try:
        import pandas as pd

        rows = [row for _, row in pd.read_json(path, lines=True).iterrows()]
    except ImportError:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = []
    for row in rows:
        for i, table in ((0, {"A>B": "baseline", "A>>B": "baseline", "B>A": "model", "B>>A": "model"}),
                         (1, {"A>B": "model", "A>>B": "model", "B>A": "baseline", "B>>A": "baseline"})):
            game = row["games"][i]
            w = 1
            if game["score"] == "A=B":
                winner = "tie"
            elif game["score"] in table:
                winner = table[game["score"]]
                w = weight if ">>" in game["score"] else 1
            else:
                w = 0
            if w:
                out += [winner] * w
    return out


def _arena_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    qs = [("q1", "Explain a hash table."), ("q2", "Reverse a string in Python."), ("q3", "ODDLABEL: pick a colour.")]
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q, "turns": [{"content": t}]}) + "\n" for q, t in qs))
    baseline = tmp_path / "gpt-4-0314.jsonl"
    baseline.write_text("".join(json.dumps({"question_id": q, "choices": [{"turns": [{"content": "b" * 50}]}]}) + "\n"
                                for q, _ in qs))
    answers = tmp_path / "mine.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "choices": [{"turns": [{"content": "m" * (30 + 20 * i)}]}]})
                               + "\n" for i, (q, _) in enumerate(qs)))
    return questions, baseline, answers


def test_failed_and_unusable_games_in_the_official_format(tmp_path):
    questions, baseline, answers = _arena_files(tmp_path)
    out = tmp_path / "o"
    kw = dict(answers=str(answers), questions=str(questions), baseline=str(baseline), output_dir=str(out),
              judge_model="stub", judge_concurrency=1, judge_backoff=0.01, bootstrap_rounds=20, quiet=True)
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(500, {})] * 2)  # the first game's request fails, retry included
        res = evaluate("arena-hard", judge_base_url=srv.url, judge_max_retries=1, **kw)
    rows = [json.loads(line) for line in (out / "model_judgment.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q1", "q2", "q3"] and all(len(r["games"]) == 2 for r in rows)
    failed = rows[0]["games"][0]
    assert failed["judgment"] == ah.API_ERROR_OUTPUT == "$ERROR$" and failed["score"] is None
    assert failed["user_prompt"].startswith("<|User Prompt|>\nExplain a hash table.")
    assert all(isinstance(g, dict) and set(g) == {"user_prompt", "judgment", "score"} for r in rows for g in r["games"])
    assert {g["score"] for g in rows[2]["games"]} == {"B=A", "A>>>B"}
    # the official reader loads it, and scores it as we do
    battles = official_battles(out / "model_judgment.jsonl")
    assert sorted(battles) == sorted(ah.battles_from_games(
        [{"game": i, "score": g["score"]} for r in rows for i, g in enumerate(r["games"])]))
    assert res["score"] == pytest.approx(ah.bt_win_rate(battles) * 100, abs=1e-7)
    # every dropped game is counted: no verdict, or a label outside the five
    assert res["n_failed"] == 1 and res["games_judged"] == 5
    assert res["n_dropped"] == 2 and res["n_unknown_label"] == 2 and res["n_malformed"] == 0
    assert res["battles"] == len(battles)

    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    ah.print_result(res, Console(file=buf, width=200))
    assert "games without a usable verdict (dropped)" in buf.getvalue()
    assert "2 (2 with a label outside the five)" in buf.getvalue()

    # the next run judges the failed game again; the error game is replaced by its verdict
    with judge_server.JudgeServer() as srv:
        res2 = evaluate("arena-hard", judge_base_url=srv.url, **kw)
        assert len(srv.requests) == 1
    rows = [json.loads(line) for line in (out / "model_judgment.jsonl").read_text().splitlines()]
    assert rows[0]["games"][0]["score"] is not None and res2["n_failed"] == 0
    assert res2["score"] == pytest.approx(ah.bt_win_rate(official_battles(out / "model_judgment.jsonl")) * 100, abs=1e-7)


def test_official_reader_would_crash_on_a_bare_null_game(tmp_path):
    """Why a failed game is an error judgment: the v0.1 reader indexes game["score"]."""
    f = tmp_path / "model_judgment.jsonl"
    f.write_text(json.dumps({"question_id": "q", "model": "m", "judge": "j",
                             "games": [None, {"user_prompt": "", "judgment": "", "score": "A=B"}]}) + "\n")
    with pytest.raises(TypeError):
        official_battles(f)


# --------------------------------------------------------------------------------------------
# the options object; answers and judge logs a rerun keeps


def test_arena_options_greedy_only_and_the_bootstrap_seed():
    from alphadpo_cli.config import ConfigError
    from alphadpo_cli.evaluation.options import DecodingOptions

    opts = ah.options_from_kwargs(ah.ArenaHardOptions, {"seed": 7, "max_new_tokens": 16, "judge": False})
    assert opts.seed == 7 and opts.decoding == DecodingOptions(max_new_tokens=16) and not opts.judge.enabled
    with pytest.raises(ConfigError, match="greedy"):
        ah.run_arena_hard(ah.ArenaHardOptions(decoding=DecodingOptions(temperature=0.7)))


def test_answers_of_other_questions_are_kept_and_a_headerless_judge_log_is_adopted(tmp_path):
    out = tmp_path / "o"
    kw = dict(model="tiny-random", baseline=str(BASELINE), max_new_tokens=4, output_dir=str(out), judge_model="stub",
              quiet=True)
    evaluate("arena-hard", questions=str(QUESTIONS), max_instances=2, judge=False, **kw)
    later = tmp_path / "later.jsonl"  # the other two questions, on their own
    later.write_text("\n".join(QUESTIONS.read_text().splitlines()[2:]) + "\n")
    evaluate("arena-hard", questions=str(later), judge=False, **kw)
    answers = [json.loads(x) for x in (out / "model_answer.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == ["q0001", "q0002", "q0003", "q0004"]

    with judge_server.JudgeServer() as srv:
        first = evaluate("arena-hard", questions=str(QUESTIONS), judge_base_url=srv.url, **kw)
        assert srv.answered > 0
    log = out / "judgments.jsonl"
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["identity"] == ah.JUDGE_LOG_IDENTITY
    log.write_text("\n".join(lines[1:]) + "\n")  # as an older version wrote it
    with judge_server.JudgeServer() as srv:
        again = evaluate("arena-hard", questions=str(QUESTIONS), judge_base_url=srv.url, **kw)
        assert srv.requests == []  # nothing generated, nothing judged
    assert again["score"] == pytest.approx(first["score"]) and log.read_text().splitlines() == lines
