"""Arena-Hard-Auto v0.1: 500 hard prompts, pairwise judgments against gpt-4-0314, Bradley-Terry score.

As the benchmark runs it: greedy answers (the preset's stop tokens and length), the official
judge prompt, two games per question with the positions swapped (game 1: A = baseline,
B = model; game 2: A = model, B = baseline), temperature 0, up to 4096 tokens, the verdict read
with `\\[\\[([AB<>=]+)\\]\\]` (a reply with no verdict is continued once, as in the official
`number_of_judgment_attempts: 2`; two different verdicts count as none): `arena_judge`. Strong verdicts
(`>>`) count three times, ties are half a win each, unusable games are dropped (and counted: no
verdict, conflicting verdicts, or a label outside the five such as `[[B=A]]`). The score is the
Bradley-Terry win probability against the baseline (baseline anchored at 1000 Elo), with a 95%
interval from 100 bootstrap resamples of the battles.

Files in the output directory:
  model_answer.jsonl    arena-hard-auto's answer format, rewritten atomically per batch (resumable)
  generation.json       what made the answers (their identity) and the decoding
  judgments.jsonl       the judge log: one line per game, appended as judged (resumable)
  model_judgment.jsonl  arena-hard-auto's judgment format (two games per question; a failed request
                        is written as the official judge does: judgment "$ERROR$", score null)
  results.json          score, interval, battle counts, average tokens
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artefacts import read_lines
from ..config import ConfigError
from ..data import DataError
from ..io import atomic_write_json
from .arena_judge import (  # noqa: F401 - the judge's protocol names, also public here
    API_ERROR_OUTPUT,
    CONTINUE_PROMPT,
    JUDGE_LOG_IDENTITY,
    JUDGE_LOG_KIND,
    JUDGE_MAX_TOKENS,
    JUDGE_TEMPERATURE,
    JUDGMENT_ATTEMPTS,
    LABELS,
    PROMPT_TEMPLATE,
    SYSTEM_PROMPT,
    VERDICT_RE,
    error_game,
    judge_all,
    judge_game,
    judge_jobs,
    parse_verdict,
    write_model_judgment,
)
from ..console import progress_bar
from .common import (
    default_output_dir,
    download_url,
    eval_cache_dir,
    model_label,
    options_from_kwargs,
    read_json_rows,
    write_jsonl,
)
from .judge import JudgeSettings, judge_settings
from .options import DecodingOptions, JudgeOptions, ModelSpec, OutputOptions

BASELINE_MODEL = "gpt-4-0314"
DEFAULT_JUDGE_MODEL = "gpt-4-1106-preview"
_RAW = "https://raw.githubusercontent.com/lmarena/arena-hard-auto/main/data/arena-hard-v0.1"
QUESTIONS_URL = f"{_RAW}/question.jsonl"
BASELINE_URL = f"{_RAW}/model_answer/{BASELINE_MODEL}.jsonl"
STRONG_WEIGHT = 3
HINT = "Pass --questions PATH and --baseline PATH (arena-hard-auto v0.1 JSONL files), or connect once to download them."


@dataclass(frozen=True)
class ArenaHardOptions:
    """Everything `run_arena_hard` takes: the shared parts and Arena-Hard's own fields. Answers are
    greedy: of `decoding`, only `max_new_tokens` and `batch_size` apply."""

    model: ModelSpec = ModelSpec()
    decoding: DecodingOptions = DecodingOptions()
    judge: JudgeOptions = JudgeOptions()
    output: OutputOptions = OutputOptions()
    answers: str | None = None  # judge these answers (arena-hard-auto JSONL) instead of generating
    questions: str | None = None  # the v0.1 questions (question.jsonl)
    baseline: str | None = None  # the gpt-4-0314 answers (model_answer/gpt-4-0314.jsonl)
    max_instances: int | None = None  # only the first N questions
    bootstrap_rounds: int = 100
    seed: int = 42  # of the bootstrap


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
    """model_answer.jsonl's answers to `questions`, generating only the missing ones. The file keeps
    every answer it holds (other questions' too) and is rewritten whole after each batch."""
    from .generate import ChatGenerator, generate_missing, reuse_generations, save_generations

    path, meta_path = out_dir / "model_answer.jsonl", out_dir / "generation.json"
    identity = {"model": model, "adapter": adapter, "decoding": decoding.identity(), "chat_template": chat_template}
    reuse_generations(path, meta_path, identity, overwrite)
    kept = {str(r.get("question_id")): r for r in read_lines(path) if isinstance(r, dict)}
    wanted = {q["question_id"] for q in questions}
    have = {qid: r for qid, r in kept.items() if qid in wanted and answer_text(r) is not None}
    todo = [(q["question_id"], [{"role": "user", "content": q["turns"][0]}]) for q in questions if q["question_id"] not in have]
    if todo:
        gen = ChatGenerator(model, adapter, decoding=decoding, backend=backend, dtype=dtype, chat_template=chat_template)
        save_generations(meta_path, identity, decoding, gen.backend)
        if console is not None and not quiet and have:
            console.print(f"resuming: {len(have)} of {len(questions)} answers already in {path}")

        def on_batch(batch):
            for qid, ans in batch:
                kept[qid] = have[qid] = {
                    "question_id": qid, "answer_id": uuid.uuid4().hex, "model_id": label,
                    "choices": [{"index": 0, "turns": [{"content": ans.text, "token_len": ans.tokens}]}],
                    "tstamp": time.time(), "finish": ans.finish}
            write_jsonl(path, kept.values())

        with progress_bar(len(todo), "generating", console, disable=quiet) as advance:
            generate_missing(gen, todo, on_batch, advance=advance)
        gen.close()
    return have


@dataclass
class _Run:
    """What the options resolve to before anything is generated or judged."""

    opts: ArenaHardOptions
    decoding: object  # generate.Decoding
    model: str | None
    chat_template: str | None
    settings: JudgeSettings | None
    judge_model: str
    questions: list[dict]
    source: str
    label: str
    out_dir: Path


def _resolve(opts: ArenaHardOptions) -> _Run:
    """Check the options and resolve the preset, the judge (failing fast on a missing key), the
    questions, the name and the output directory."""
    from .generate import decoding_for

    spec, dec, judge = opts.model, opts.decoding, opts.judge
    if dec.temperature is not None or dec.top_p is not None or dec.seed is not None:
        raise ConfigError("Arena-Hard answers are greedy: decoding.temperature, top_p and seed are not used (set only "
                          "max_new_tokens and batch_size)")
    decoding, preset_model, chat_template = decoding_for(spec.preset, max_new_tokens=dec.max_new_tokens,
                                                         batch_size=dec.batch_size, greedy=True)
    if spec.preset is None and dec.max_new_tokens is None:
        decoding.max_new_tokens = 4096  # arena-hard-auto's answer length
    model = spec.model or (preset_model if spec.preset else None)
    if opts.answers is None and not model and not spec.adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model), or --answers FILE")
    judge_model = judge.model or DEFAULT_JUDGE_MODEL
    settings = None
    if judge.enabled:
        settings = judge_settings(judge_model, judge.base_url, api_key_env=judge.api_key_env,
                                  concurrency=judge.concurrency, max_retries=judge.max_retries, timeout=judge.timeout,
                                  backoff=judge.backoff)
    qs, qsrc = load_questions(opts.questions)
    if opts.max_instances is not None:
        if opts.max_instances < 1:
            raise ConfigError("--max-instances must be at least 1")
        qs = qs[:opts.max_instances]
    label = opts.output.name or (model_label(model, spec.adapter) if opts.answers is None else Path(opts.answers).stem)
    out_dir = Path(opts.output.output_dir) if opts.output.output_dir else default_output_dir(label, "arena-hard")
    out_dir.mkdir(parents=True, exist_ok=True)
    return _Run(opts, decoding, model, chat_template, settings, judge_model, qs, qsrc, label, out_dir)


def _answers(run: _Run, console) -> dict[str, dict]:
    """{question_id: answer record}: from `--answers FILE`, else generated (resuming)."""
    opts, qs = run.opts, run.questions
    if opts.answers is None:
        spec = opts.model
        return _generate_answers(qs, run.out_dir, label=run.label, model=run.model, adapter=spec.adapter,
                                 decoding=run.decoding, backend=spec.backend, dtype=spec.dtype,
                                 chat_template=run.chat_template, overwrite=opts.output.overwrite, console=console,
                                 quiet=opts.output.quiet)
    given = {str(r.get("question_id")): r for r in read_json_rows(Path(opts.answers), "model answers")}
    missing = [q["question_id"] for q in qs if q["question_id"] not in given or answer_text(given[q["question_id"]]) is None]
    if missing:
        raise DataError(f"{opts.answers}: no answer for {len(missing)} question(s), e.g. {missing[0]}")
    return given


def run_arena_hard(options: ArenaHardOptions | None = None, /, *, console=None, **kwargs) -> dict:
    """Arena-Hard v0.1 end to end; returns the score with its interval, counts and paths.

    Takes an `ArenaHardOptions`, or the same as flat keywords (`model=`, `judge_model=`,
    `output_dir=`, `seed=` for the bootstrap, ...: `common.FLAT_OPTIONS`), as
    `evaluate("arena-hard", ...)` passes them."""
    if options is None:
        options = options_from_kwargs(ArenaHardOptions, kwargs)
    elif kwargs:
        raise TypeError(f"run_arena_hard: options and keywords {sorted(kwargs)} together")
    run = _resolve(options)
    qs, out_dir = run.questions, run.out_dir
    have = _answers(run, console)
    tokens = [((have[q["question_id"]].get("choices") or [{}])[0].get("turns") or [{}])[0].get("token_len") for q in qs]
    tokens = [t for t in tokens if isinstance(t, (int, float))]
    result = {"name": run.label, "output_dir": str(out_dir), "questions": run.source, "n_questions": len(qs),
              "decoding": run.decoding.to_dict(), "model_answer": str(out_dir / "model_answer.jsonl"),
              "avg_tokens": (sum(tokens) / len(tokens)) if tokens else None}
    if options.judge.enabled:
        result.update(_judge(run, have, console))
    atomic_write_json(out_dir / "results.json", result)
    return result


def _judge(run: _Run, have: dict[str, dict], console) -> dict:
    """Judge both games of every question against the baseline; the scores, and model_judgment.jsonl."""
    qs, opts = run.questions, run.opts
    base, bsrc = load_baseline(opts.baseline)
    missing = [q["question_id"] for q in qs if q["question_id"] not in base]
    if missing:
        raise DataError(f"{bsrc}: no baseline answer for {len(missing)} question(s), e.g. {missing[0]}")
    answers = {q["question_id"]: answer_text(have[q["question_id"]]) for q in qs}
    jobs = judge_jobs(qs, answers, base, run.label, run.judge_model)
    done, client = judge_all(jobs, run.out_dir / "judgments.jsonl", run.settings, opts.judge.rejudge_malformed,
                              console, opts.output.quiet)
    games = [done[j["key"]] for j in jobs if j["key"] in done]
    write_model_judgment(run.out_dir / "model_judgment.jsonl", qs, jobs, done, run.label, run.judge_model)
    return {**_scores(games, jobs, done, run.judge_model, opts.bootstrap_rounds, opts.seed),
            "judge_stats": dict(client.stats), "model_judgment": str(run.out_dir / "model_judgment.jsonl")}


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
