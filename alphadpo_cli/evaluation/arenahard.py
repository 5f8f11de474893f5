"""Arena-Hard-Auto v0.1: 500 hard prompts, pairwise judgments against gpt-4-0314, Bradley-Terry score.

As the benchmark runs it: greedy answers (the preset's stop tokens and length), the official
judge prompt, two games per question with the positions swapped (game 1: A = baseline,
B = model; game 2: A = model, B = baseline), temperature 0, up to 4096 tokens, the verdict read
with `\\[\\[([AB<>=]+)\\]\\]` (a reply with no verdict is continued once, as in the official
`number_of_judgment_attempts: 2`; two different verdicts count as none). Strong verdicts
(`>>`) count three times, ties are half a win each, unusable games are dropped (and counted: no
verdict, conflicting verdicts, or a label outside the five such as `[[B=A]]`). The score is the
Bradley-Terry win probability against the baseline (baseline anchored at 1000 Elo), with a 95%
interval from 100 bootstrap resamples of the battles.

Files in the output directory:
  model_answer.jsonl    arena-hard-auto's answer format, appended per batch (resumable)
  judgments.jsonl       one line per game, appended as judged (resumable)
  model_judgment.jsonl  arena-hard-auto's judgment format (two games per question; a failed request
                        is written as the official judge does: judgment "$ERROR$", score null)
  results.json          score, interval, battle counts, average tokens
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..data import DataError
from ..io import atomic_path, atomic_write_json
from .common import (
    JsonlLog,
    default_output_dir,
    download_url,
    eval_cache_dir,
    model_label,
    progress_bar,
    read_json_rows,
    read_log,
)
from .judge import JudgeClient, JudgeSettings, judge_settings, message_text, run_concurrently

BASELINE_MODEL = "gpt-4-0314"
DEFAULT_JUDGE_MODEL = "gpt-4-1106-preview"
_RAW = "https://raw.githubusercontent.com/lmarena/arena-hard-auto/main/data/arena-hard-v0.1"
QUESTIONS_URL = f"{_RAW}/question.jsonl"
BASELINE_URL = f"{_RAW}/model_answer/{BASELINE_MODEL}.jsonl"
JUDGE_TEMPERATURE = 0
JUDGE_MAX_TOKENS = 4096
JUDGMENT_ATTEMPTS = 2
STRONG_WEIGHT = 3
VERDICT_RE = re.compile(r"\[\[([AB<>=]+)\]\]")
CONTINUE_PROMPT = "continue your judgment and finish by outputting a final verdict label"

SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is to "
    "evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own answer to the prompt. "
    "You must provide your answers before judging any answers.\n\nWhen evaluating the assistants' answers, compare both "
    "assistants' answers with your answer. You must identify and correct any mistakes or inaccurate information.\n\n"
    "Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer correctly "
    "responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or more than one "
    "interpretation, it is more helpful and appropriate to ask for clarifications or more information from the user "
    "than providing an answer based on assumptions. Relevant means all parts of the response closely connect or are "
    "appropriate to what is being asked. Concise means the response is clear and not verbose or excessive.\n\n"
    "Then consider the creativity and novelty of the assistant's answers when needed. Finally, identify any missing "
    "important information in the assistants' answers that would be beneficial to include when responding to the user "
    "prompt.\n\nAfter providing your explanation, you must output only one of the following choices as your final "
    "verdict with a label:\n\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: "
    "[[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n5. Assistant B is "
    "significantly better: [[B>>A]]\n\nExample output: \"My final verdict is tie: [[A=B]]\"."
)
PROMPT_TEMPLATE = (
    "<|User Prompt|>\n{question_1}\n\n<|The Start of Assistant A's Answer|>\n{answer_1}\n<|The End of Assistant A's "
    "Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_2}\n<|The End of Assistant B's Answer|>"
)
HINT = "Pass --questions PATH and --baseline PATH (arena-hard-auto v0.1 JSONL files), or connect once to download them."


# ---------------------------------------------------------------------------------------------
# data


def load_questions(path: str | None = None) -> tuple[list[dict], str]:
    src = Path(path) if path else download_url(QUESTIONS_URL, eval_cache_dir("arena_hard", "question.jsonl"),
                                               what="the Arena-Hard v0.1 questions", hint=HINT)
    out, seen = [], set()
    for i, r in enumerate(read_json_rows(src, "Arena-Hard questions")):
        qid, turns = r.get("question_id"), r.get("turns")
        if qid is None or not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
                or not isinstance(turns[0].get("content"), str):
            raise DataError(f"{src}, row {i + 1}: expected question_id and turns: [{{content: ...}}]")
        if str(qid) in seen:
            raise DataError(f"{src}, row {i + 1}: duplicate question_id {qid}")
        seen.add(str(qid))
        out.append({"question_id": str(qid), "turns": [t.get("content", "") for t in turns],
                    "category": r.get("category", ""), "cluster": r.get("cluster", "")})
    return out, str(src)


def answer_text(row: dict) -> str | None:
    try:
        return row["choices"][0]["turns"][0]["content"]
    except (KeyError, IndexError, TypeError):
        return row.get("answer") if isinstance(row.get("answer"), str) else None


def load_baseline(path: str | None = None) -> tuple[dict[str, str], str]:
    src = Path(path) if path else download_url(BASELINE_URL, eval_cache_dir("arena_hard", f"{BASELINE_MODEL}.jsonl"),
                                               what=f"the {BASELINE_MODEL} baseline answers", hint=HINT)
    out = {}
    for i, r in enumerate(read_json_rows(src, "Arena-Hard baseline answers")):
        text = answer_text(r)
        if r.get("question_id") is None or text is None:
            raise DataError(f"{src}, row {i + 1}: expected question_id and choices[0].turns[0].content")
        out[str(r["question_id"])] = text
    return out, str(src)


# ---------------------------------------------------------------------------------------------
# judging


def parse_verdict(judgment: str) -> tuple[str | None, bool]:
    """(verdict, try_again): one distinct label -> it; none -> (None, True); several -> (None, False)."""
    found = [m for m in VERDICT_RE.findall(judgment) if m != ""]
    distinct = set(found)
    if not distinct:
        return None, True
    if len(distinct) == 1:
        return found[0].strip("\n"), False
    return None, False


def judge_game(client: JudgeClient, job: dict) -> dict:
    a, b = (job["baseline"], job["answer"]) if job["game"] == 0 else (job["answer"], job["baseline"])
    user = PROMPT_TEMPLATE.format(question_1=job["question"], answer_1=a, answer_2=b)
    conv = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    judgment, score, error = "", None, None
    for _ in range(JUDGMENT_ATTEMPTS):
        resp = client.chat(conv, temperature=JUDGE_TEMPERATURE, max_tokens=JUDGE_MAX_TOKENS)
        new = message_text(resp)
        if new is None:
            error = "the judge's response has no message content"
            break
        judgment += "\n" + new
        score, again = parse_verdict(judgment)
        conv.append({"role": "assistant", "content": new})
        if not again:
            break
        conv.append({"role": "user", "content": CONTINUE_PROMPT})
    if score is None and error is None:
        found = sorted(set(VERDICT_RE.findall(judgment)))
        error = f"conflicting verdicts {found}" if found else "no [[verdict]] label in the judgment"
    return {"key": job["key"], "question_id": job["question_id"], "game": job["game"], "model": job["model"],
            "judge": job["judge"], "user_prompt": user, "judgment": judgment, "score": score,
            "status": "ok" if score is not None else "malformed", "error": error}


#: What arena-hard-auto's gen_judgment.py writes for a game whose judge request failed (its
#: API_ERROR_OUTPUT, no verdict): show_result.py skips such a game (score null, weight 0).
API_ERROR_OUTPUT = "$ERROR$"
LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")


def error_game(job: dict) -> dict:
    """A failed game in the official model_judgment format: the prompt, an error judgment, score null."""
    a, b = (job["baseline"], job["answer"]) if job["game"] == 0 else (job["answer"], job["baseline"])
    return {"user_prompt": PROMPT_TEMPLATE.format(question_1=job["question"], answer_1=a, answer_2=b),
            "judgment": API_ERROR_OUTPUT, "score": None}


_GAME1 = {"A=B": ("tie", 1), "A>B": ("baseline", 1), "A>>B": ("baseline", STRONG_WEIGHT),
          "B>A": ("model", 1), "B>>A": ("model", STRONG_WEIGHT)}
_GAME2 = {"A=B": ("tie", 1), "A>B": ("model", 1), "A>>B": ("model", STRONG_WEIGHT),
          "B>A": ("baseline", 1), "B>>A": ("baseline", STRONG_WEIGHT)}


def battles_from_games(games: list[dict]) -> list[str]:
    """Winners ('model', 'baseline', 'tie'), one entry per battle, strong verdicts repeated."""
    out = []
    for g in games:
        table = _GAME1 if g["game"] == 0 else _GAME2
        hit = table.get(g.get("score") or "")
        if hit is None:
            continue  # unusable verdict: weight 0, as in arena-hard-auto
        winner, weight = hit
        out.extend([winner] * weight)
    return out


def bt_win_rate(battles: list[str]) -> float:
    """Bradley-Terry MLE (Elo scale 400, base 10, ties = half a win each side) -> P(model beats baseline).
    With two players the MLE is closed-form: the tie-split win share."""
    wins = 2 * sum(1 for b in battles if b == "model") + sum(1 for b in battles if b == "tie")
    losses = 2 * sum(1 for b in battles if b == "baseline") + sum(1 for b in battles if b == "tie")
    if wins + losses == 0:
        return float("nan")
    return wins / (wins + losses)


def elo_from_win_rate(p: float, scale: float = 400.0, base: float = 10.0, anchor: float = 1000.0) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return anchor + scale * math.log(p / (1 - p), base)


def bootstrap_interval(battles: list[str], rounds: int = 100, seed: int = 42) -> tuple[float, float]:
    if not battles or rounds <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    arr = np.array(battles)
    rates = []
    for _ in range(rounds):
        sample = arr[rng.integers(0, len(arr), len(arr))]
        rates.append(bt_win_rate(list(sample)))
    return float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))


# ---------------------------------------------------------------------------------------------
# the command


def _generate_answers(questions, out_dir: Path, *, label, model, adapter, decoding, backend, dtype, chat_template,
                      overwrite, console, quiet) -> dict[str, dict]:
    from .generate import ChatGenerator, generate_missing, reuse_generations

    path, meta_path = out_dir / "model_answer.jsonl", out_dir / "generation.json"
    identity = {"model": model, "adapter": adapter, "decoding": decoding.identity(), "chat_template": chat_template}
    reuse_generations(path, meta_path, identity, overwrite)
    wanted = {q["question_id"] for q in questions}
    have = {str(r["question_id"]): r for r in read_log(path) if str(r.get("question_id")) in wanted and answer_text(r) is not None}
    todo = [(q["question_id"], [{"role": "user", "content": q["turns"][0]}]) for q in questions if q["question_id"] not in have]
    if todo:
        gen = ChatGenerator(model, adapter, decoding=decoding, backend=backend, dtype=dtype, chat_template=chat_template)
        atomic_write_json(meta_path, {"identity": identity, "decoding": decoding.to_dict(), "backend": gen.backend})
        if console is not None and not quiet and have:
            console.print(f"resuming: {len(have)} of {len(questions)} answers already in {path}")
        with JsonlLog(path) as log, progress_bar(len(todo), "generating", console, disable=quiet) as advance:
            def on_batch(batch):
                for qid, ans in batch:
                    rec = {"question_id": qid, "answer_id": uuid.uuid4().hex, "model_id": label,
                           "choices": [{"index": 0, "turns": [{"content": ans.text, "token_len": ans.tokens}]}],
                           "tstamp": time.time(), "finish": ans.finish}
                    log.append(rec)
                    have[qid] = rec

            generate_missing(gen, todo, on_batch, advance=advance)
        gen.close()
    return have


def run_arena_hard(*, model: str | None = None, adapter: str | None = None, preset: str | None = None,
                   answers: str | None = None, name: str | None = None, output_dir: str | None = None,
                   questions: str | None = None, baseline: str | None = None, max_instances: int | None = None,
                   max_new_tokens: int | None = None, batch_size: int | None = None, backend: str = "auto",
                   dtype: str = "auto", overwrite: bool = False, judge: bool = True, judge_base_url: str | None = None,
                   judge_model: str | None = None, judge_api_key_env: str = "OPENAI_API_KEY", judge_concurrency: int = 8,
                   judge_max_retries: int = 6, judge_timeout: float = 300.0, judge_backoff: float = 1.0,
                   rejudge_malformed: bool = False, bootstrap_rounds: int = 100, seed: int = 42, console=None,
                   quiet: bool = False) -> dict:
    from .generate import decoding_for

    decoding, preset_model, chat_template = decoding_for(preset, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                         greedy=True)
    if preset is None and max_new_tokens is None:
        decoding.max_new_tokens = 4096  # arena-hard-auto's answer length
    model = model or (preset_model if preset else None)
    if answers is None and not model and not adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model), or --answers FILE")
    judge_model = judge_model or DEFAULT_JUDGE_MODEL
    settings: JudgeSettings | None = None
    if judge:
        settings = judge_settings(judge_model, judge_base_url, api_key_env=judge_api_key_env,
                                  concurrency=judge_concurrency, max_retries=judge_max_retries, timeout=judge_timeout,
                                  backoff=judge_backoff)
    qs, qsrc = load_questions(questions)
    if max_instances is not None:
        if max_instances < 1:
            raise ConfigError("--max-instances must be at least 1")
        qs = qs[:max_instances]
    label = name or (model_label(model, adapter) if answers is None else Path(answers).stem)
    out_dir = Path(output_dir) if output_dir else default_output_dir(label, "arena-hard")
    out_dir.mkdir(parents=True, exist_ok=True)

    if answers is not None:
        given = {str(r.get("question_id")): r for r in read_json_rows(Path(answers), "model answers")}
        missing = [q["question_id"] for q in qs if q["question_id"] not in given or answer_text(given[q["question_id"]]) is None]
        if missing:
            raise DataError(f"{answers}: no answer for {len(missing)} question(s), e.g. {missing[0]}")
        have = given
    else:
        have = _generate_answers(qs, out_dir, label=label, model=model, adapter=adapter, decoding=decoding,
                                 backend=backend, dtype=dtype, chat_template=chat_template, overwrite=overwrite,
                                 console=console, quiet=quiet)
    tokens = [((have[q["question_id"]].get("choices") or [{}])[0].get("turns") or [{}])[0].get("token_len") for q in qs]
    tokens = [t for t in tokens if isinstance(t, (int, float))]
    result = {"name": label, "output_dir": str(out_dir), "questions": qsrc, "n_questions": len(qs),
              "decoding": decoding.to_dict(), "model_answer": str(out_dir / "model_answer.jsonl"),
              "avg_tokens": (sum(tokens) / len(tokens)) if tokens else None}
    if not judge:
        atomic_write_json(out_dir / "results.json", result)
        return result

    base, bsrc = load_baseline(baseline)
    missing = [q["question_id"] for q in qs if q["question_id"] not in base]
    if missing:
        raise DataError(f"{bsrc}: no baseline answer for {len(missing)} question(s), e.g. {missing[0]}")
    jobs = _judge_jobs(qs, have, base, label, judge_model)
    done, client = _judge_all(jobs, out_dir / "judgments.jsonl", settings, judge_model, rejudge_malformed, console, quiet)
    games = [done[j["key"]] for j in jobs if j["key"] in done]
    _write_model_judgment(out_dir / "model_judgment.jsonl", qs, jobs, done, label, judge_model)
    result.update(_scores(games, jobs, done, judge_model, bootstrap_rounds, seed))
    result.update(judge_stats=dict(client.stats), model_judgment=str(out_dir / "model_judgment.jsonl"))
    atomic_write_json(out_dir / "results.json", result)
    return result


def _digest(*parts: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def print_result(result: dict, console) -> None:
    from rich.table import Table

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    t = Table(title=f"Arena-Hard v0.1: {result['name']} ({result['n_questions']} questions)")
    t.add_column("")
    t.add_column("value", justify="right")
    if "score" in result:
        t.add_row(f"score (win rate vs {result['baseline']}, Bradley-Terry)", fmt(result.get("score")))
        if result.get("score") is not None and result.get("ci_lower") is not None:
            t.add_row("95% CI", f"(-{result['score'] - result['ci_lower']:.1f}, +{result['ci_upper'] - result['score']:.1f})")
        w = result["battle_winners"]
        t.add_row("battles model / baseline / tie", f"{w['model']} / {w['baseline']} / {w['tie']}")
        t.add_row("games judged", f"{result['games_judged']} of {result['games_expected']}")
        dropped = result.get("n_dropped", result.get("n_malformed"))
        if dropped:
            unknown = result.get("n_unknown_label") or 0
            detail = f" ({unknown} with a label outside the five)" if unknown else ""
            t.add_row("games without a usable verdict (dropped)", f"{dropped}{detail}")
        if result.get("n_failed"):
            t.add_row("[red]failed requests (rerun to retry)[/]", str(result["n_failed"]))
        t.add_row("judge", str(result.get("judge")))
    t.add_row("average #tokens (model tokenizer)", fmt(result.get("avg_tokens"), ".0f"))
    console.print(t)
    console.print(f"outputs: {result['output_dir']}", highlight=False)


def _judge_jobs(qs: list[dict], have: dict, base: dict, label: str, judge_model: str) -> list[dict]:
    """Two games per question (the model's answer first, then the baseline's), keyed by what is judged."""
    jobs = []
    for q in qs:
        ans = answer_text(have[q["question_id"]])
        for game in (0, 1):
            key = f"{judge_model}|{q['question_id']}|{game}|{_digest(ans, base[q['question_id']])}"
            jobs.append({"key": key, "question_id": q["question_id"], "game": game, "model": label, "judge": judge_model,
                         "question": q["turns"][0], "answer": ans, "baseline": base[q["question_id"]]})
    return jobs


def _judge_all(jobs: list[dict], log_path: Path, settings: JudgeSettings, judge_model: str, rejudge_malformed: bool,
               console, quiet: bool) -> tuple[dict[str, dict], JudgeClient]:
    """Judge the games not in the log yet (a rerun resumes); every result or failure is appended as it comes."""
    done: dict[str, dict] = {}
    for r in read_log(log_path):
        if r.get("status") == "ok" or (r.get("status") == "malformed" and not rejudge_malformed):
            done[r["key"]] = r
    todo = [j for j in jobs if j["key"] not in done]
    client = JudgeClient(settings)
    with JsonlLog(log_path) as log, progress_bar(len(todo), f"judging ({judge_model})", console, disable=quiet) as advance:
        def on_result(job, rec, exc):
            if exc is not None:
                log.append({k: job[k] for k in ("key", "question_id", "game", "model", "judge")} |
                           {"score": None, "status": "failed", "error": str(exc)})
            else:
                log.append(rec)
                done[job["key"]] = rec

        run_concurrently(todo, lambda j: judge_game(client, j), on_result, concurrency=settings.concurrency,
                         advance=advance)
    return done, client


def _write_model_judgment(path: Path, qs: list[dict], jobs: list[dict], done: dict[str, dict], label: str,
                          judge_model: str) -> None:
    """Every question with both games, as gen_judgment.py writes them: a failed request is an error
    game with score null (which show_result.py skips), never a missing entry or a bare null."""
    per_q: dict[str, list] = {}
    for j in jobs:
        g = done.get(j["key"])
        per_q.setdefault(j["question_id"], [None, None])[j["game"]] = (
            {k: g[k] for k in ("user_prompt", "judgment", "score")} if g is not None else error_game(j))
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for q in qs:
                fh.write(json.dumps({"question_id": q["question_id"], "model": label, "judge": judge_model,
                                     "games": per_q[q["question_id"]]}, ensure_ascii=False) + "\n")


def _scores(games: list[dict], jobs: list[dict], done: dict[str, dict], judge_model: str, bootstrap_rounds: int,
            seed: int) -> dict:
    """The Bradley-Terry score against the baseline with its bootstrap interval, and the game counts."""
    battles = battles_from_games(games)
    p = bt_win_rate(battles)
    lo, hi = bootstrap_interval(battles, bootstrap_rounds, seed)
    verdicts: dict[str, int] = {}
    for g in games:
        verdicts[g.get("score") or "none"] = verdicts.get(g.get("score") or "none", 0) + 1
    return {
        "score": None if math.isnan(p) else p * 100,
        "ci_lower": None if math.isnan(lo) else lo * 100,
        "ci_upper": None if math.isnan(hi) else hi * 100,
        "elo": None if math.isnan(p) else elo_from_win_rate(p),
        "baseline": BASELINE_MODEL, "judge": judge_model, "bootstrap_rounds": bootstrap_rounds,
        "battles": len(battles), "battle_winners": {w: battles.count(w) for w in ("model", "baseline", "tie")},
        "verdicts": verdicts, "games_judged": len(games), "games_expected": len(jobs),
        "n_malformed": sum(1 for g in games if g.get("status") == "malformed"),
        # every judged game that adds no battle: no verdict, conflicting ones, or a label outside the five
        "n_dropped": sum(1 for g in games if g.get("score") not in LABELS),
        "n_unknown_label": sum(1 for g in games if g.get("score") is not None and g.get("score") not in LABELS),
        "n_failed": sum(1 for j in jobs if j["key"] not in done),
    }
