"""Arena-Hard v0.1's judge: the official prompt, two games per question with the positions swapped,
the verdict read with `\\[\\[([AB<>=]+)\\]\\]` (a reply with no verdict is continued once, as in the
official `number_of_judgment_attempts: 2`; two different verdicts count as none).

Each game's result is appended to the judge log (`judgments.jsonl`, an `artefacts.WorkLog`) as it
is judged; a rerun asks only for the games not there. Its records are keyed by what was judged
(judge model, question, game, both answers), so a log written before logs had headers is adopted
as it is. `model_judgment.jsonl` is written in arena-hard-auto's format from it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..artefacts import WorkLog
from ..console import progress_bar
from .common import write_jsonl
from .judge import JudgeClient, JudgeSettings, message_text, run_concurrently

JUDGE_TEMPERATURE = 0
JUDGE_MAX_TOKENS = 4096
JUDGMENT_ATTEMPTS = 2
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
JUDGE_LOG_KIND = "Arena-Hard judge log"
#: what the judge log's records depend on beyond their keys (judge model, question, game, both answers)
JUDGE_LOG_IDENTITY = {"benchmark": "arena-hard-v0.1", "judge_temperature": JUDGE_TEMPERATURE,
                      "judge_max_tokens": JUDGE_MAX_TOKENS, "judgment_attempts": JUDGMENT_ATTEMPTS}


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


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def judge_jobs(qs: list[dict], answers: dict[str, str], base: dict[str, str], label: str, judge_model: str) -> list[dict]:
    """Two games per question (the model's answer first, then the baseline's), keyed by what is
    judged; `answers` and `base` are the model's and the baseline's answer texts by question id."""
    jobs = []
    for q in qs:
        ans = answers[q["question_id"]]
        for game in (0, 1):
            key = f"{judge_model}|{q['question_id']}|{game}|{_digest(ans, base[q['question_id']])}"
            jobs.append({"key": key, "question_id": q["question_id"], "game": game, "model": label, "judge": judge_model,
                         "question": q["turns"][0], "answer": ans, "baseline": base[q["question_id"]]})
    return jobs


def judge_all(jobs: list[dict], log_path: Path, settings: JudgeSettings, rejudge_malformed: bool, console,
               quiet: bool) -> tuple[dict[str, dict], JudgeClient]:
    """Judge the games not in the log yet (a rerun resumes); every result or failure is appended as it comes."""
    client = JudgeClient(settings)
    with WorkLog(log_path, JUDGE_LOG_IDENTITY, kind=JUDGE_LOG_KIND, adopt_headerless=True) as log:
        keep = ("ok",) if rejudge_malformed else ("ok", "malformed")
        done = {r["key"]: r for r in log.records if r.get("status") in keep}
        todo = [j for j in jobs if j["key"] not in done]
        _judge_todo(todo, log, done, client, settings, console, quiet)
    return done, client


def _judge_todo(todo: list[dict], log: WorkLog, done: dict[str, dict], client: JudgeClient, settings: JudgeSettings,
                console, quiet: bool) -> None:
    """Judge `todo` concurrently; each result (or failure) is appended to `log` as it comes."""
    with progress_bar(len(todo), f"judging ({settings.model})", console, disable=quiet) as advance:
        def on_result(job, rec, exc):
            if exc is not None:
                log.append({k: job[k] for k in ("key", "question_id", "game", "model", "judge")} |
                           {"score": None, "status": "failed", "error": str(exc)})
            else:
                log.append(rec)
                done[job["key"]] = rec

        run_concurrently(todo, lambda j: judge_game(client, j), on_result, concurrency=settings.concurrency,
                         advance=advance)


def write_model_judgment(path: Path, qs: list[dict], jobs: list[dict], done: dict[str, dict], label: str,
                          judge_model: str) -> None:
    """Every question with both games, as gen_judgment.py writes them: a failed request is an error
    game with score null (which show_result.py skips), never a missing entry or a bare null."""
    per_q: dict[str, list] = {}
    for j in jobs:
        g = done.get(j["key"])
        per_q.setdefault(j["question_id"], [None, None])[j["game"]] = (
            {k: g[k] for k in ("user_prompt", "judgment", "score")} if g is not None else error_game(j))
    write_jsonl(path, ({"question_id": q["question_id"], "model": label, "judge": judge_model,
                        "games": per_q[q["question_id"]]} for q in qs))
