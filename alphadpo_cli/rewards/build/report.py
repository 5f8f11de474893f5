"""What a build reports: the statistics of a split's pairs, the throughput, the versions, and the
summary table the command prints."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from .options import BuildSummary
from .pairing import DROP_REASONS


def _quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation between closest ranks (R's type 7, numpy's
    "linear", `statistics.quantiles(method="inclusive")`). Kept by hand: those two compute the same
    rule in another floating-point order, and the 4-decimal rounding of `describe` then differs
    in about 1 case in 20 (and `statistics.quantiles` refuses a single value before Python 3.13)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(xs: Sequence[float]) -> dict | None:
    """mean, min, p10, p50, p90, max (linear interpolation), or None for no values."""
    if not xs:
        return None
    out = {"mean": statistics.fmean(xs), "min": min(xs)}
    out.update({f"p{int(q * 100)}": _quantile(xs, q) for q in (0.1, 0.5, 0.9)})
    out["max"] = max(xs)
    return {k: round(v, 4) for k, v in out.items()}


def mean4(xs: Sequence[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


def versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from ... import __version__

    out = {"alphadpo": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def throughput(answers: dict, scores: dict, num_samples: int) -> dict:
    """Summed over every batch of every shard: process-seconds, not wall time."""
    gen_s = sum(r.get("seconds", 0.0) for r in answers.values())
    score_s = sum(r.get("seconds", 0.0) for r in scores.values())
    prompts = sum(len(r["answers"]) for r in answers.values())
    tokens = sum(r.get("tokens", 0) for r in answers.values())
    rate = lambda x, s: round(x / s, 3) if s > 0 else None  # noqa: E731
    return {"generation_seconds": round(gen_s, 2), "scoring_seconds": round(score_s, 2),
            "generated_tokens": tokens, "prompts_per_s": rate(prompts, gen_s),
            "answers_per_s": rate(prompts * num_samples, gen_s), "tokens_per_s": rate(tokens, gen_s),
            "scored_answers_per_s": rate(prompts * num_samples, score_s),
            "seconds_per_1000_prompts": round(1000 * (gen_s + score_s) / prompts, 1) if prompts else None}


# ---------------------------------------------------------------------------------------------
# the summary table


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def _split_table(summary: BuildSummary):
    from rich.table import Table

    rec = summary.record
    splits = rec["splits"]
    table = Table(title=f"data build: {summary.output_dir} ({rec['strategy']}, {rec['num_samples']} samples per prompt)")
    table.add_column("")
    for split in splits:
        table.add_column(split, justify="right")

    def add(label, get):
        table.add_row(label, *(get(s) for s in splits.values()))

    add("prompts / answers", lambda s: f"{s['prompts']:,} / {s['answers']:,}")
    add("answers ended on their own",
        lambda s: _fmt(s["finished_share"] * 100 if s["finished_share"] is not None else None, ".1f") + " %")
    add("pairs (prompts with a pair)", lambda s: f"{s['pairs']:,} ({s['prompts_with_pair']:,})")
    model_reward = "model" in (rec.get("reward") or {})
    for key, label in (("reward_input_cut", "answers cut to the reward model's max length (start cut)"),
                       ("unscored_answers", "answers the reward model could not score (left out)")):
        if model_reward or any(s.get(key) for s in splits.values()):
            add(label, lambda s, k=key: f"{s.get(k, 0):,}")
    for reason in DROP_REASONS:
        if any(s["dropped"].get(reason) for s in splits.values()):
            add(f"dropped: {reason.replace('_', ' ')}", lambda s, r=reason: f"{s['dropped'].get(r, 0):,}")
    add("score gap mean", lambda s: _fmt((s["score_gap"] or {}).get("mean")))
    add("score gap p10 / p50 / p90",
        lambda s: " / ".join(_fmt((s["score_gap"] or {}).get(q)) for q in ("p10", "p50", "p90")))
    add("score chosen / rejected", lambda s: f"{_fmt(s['score_chosen_mean'])} / {_fmt(s['score_rejected_mean'])}")
    add("tokens chosen / rejected",
        lambda s: f"{_fmt(s['chosen_tokens_mean'], '.1f')} / {_fmt(s['rejected_tokens_mean'], '.1f')}")
    for name in sorted({k for s in splits.values() for k in s["reward_extras_mean"]}):
        add(f"reward {name} (all answers)", lambda s, n=name: _fmt(s["reward_extras_mean"].get(n)))
    return table


def print_summary(summary: BuildSummary, console) -> None:
    """The build's numbers as a table, and its throughput (or what is left to do)."""
    if not summary.complete:
        console.print(f"[yellow]not finished:[/] {summary.missing} of {summary.batches} batches to do "
                      f"(this call: {summary.generated} sampled, {summary.scored} scored)")
        return
    console.print(_split_table(summary))
    rec = summary.record
    t = rec["throughput"]
    scoring = f"{_fmt(t['scored_answers_per_s'], '.1f')} answers/s ({t['scoring_seconds']:.1f} s)" \
        if t["scoring_seconds"] >= 0.1 else f"{t['scoring_seconds']:.2f} s"
    console.print(f"generation: {_fmt(t['prompts_per_s'])} prompts/s, {_fmt(t['answers_per_s'], '.2f')} answers/s, "
                  f"{_fmt(t['tokens_per_s'], '.1f')} tokens/s ({t['generation_seconds']:.1f} s, {rec['backend']}); "
                  f"scoring: {scoring}; {_fmt(t['seconds_per_1000_prompts'], '.0f')} s per 1,000 prompts "
                  "(summed over batches)", highlight=False)
