"""The numbers and the table of `alphadpo eval reward`: the mean reward with its standard error,
the win rate against the baseline (ties counted half), lengths, the reward's further numbers, and
a reward model's cut and unscored items (see `rewards.evaluate`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..prompts import PromptRow
from . import Scored, is_function_spec, prompt_text

__all__ = ["KNOWN_EXTRAS", "side_stats", "win_rate", "summarize", "per_prompt", "print_result"]

KNOWN_EXTRAS = {"constraints_satisfied": "constraints satisfied",
                "all_constraints_satisfied": "prompts with all constraints satisfied"}


def _mean_se(xs: Sequence[float]) -> tuple[float | None, float | None]:
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    if n == 1:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def side_stats(scored: Sequence[Scored], answers: Sequence[dict]) -> dict:
    """Mean reward ± SE and the means of the reward's extras over the answers the reward scored;
    how many it could not score (`unscored`, left out) and how many inputs a reward model cut to
    its max length (`reward_input_cut`); lengths (tokens, words) and the share cut off by the
    token budget over all answers."""
    ok = [s for s in scored if s.ok]
    mean, se = _mean_se([s.score for s in ok])
    found = {k for s in ok for k in s.extras}
    names = [k for k in KNOWN_EXTRAS if k in found] + sorted(found - set(KNOWN_EXTRAS))
    extras = {k: _mean_se([s.extras[k] for s in ok if k in s.extras])[0] for k in names}
    tokens = [a["tokens"] for a in answers if isinstance(a.get("tokens"), (int, float))]
    return {"n": len(ok), "unscored": len(scored) - len(ok), "reward_input_cut": sum(s.cut for s in scored),
            "mean_reward": mean, "reward_se": se, "extras": extras,
            "length_tokens": sum(tokens) / len(tokens) if tokens and len(tokens) == len(answers) else None,
            "length_words": sum(len(a["output"].split()) for a in answers) / len(answers) if answers else None,
            "truncated": sum(a.get("finish") == "length" for a in answers) / len(answers) if answers else None}


def win_rate(model: Sequence[Scored], baseline: Sequence[Scored], model_answers: Sequence[dict],
             baseline_answers: Sequence[dict]) -> dict:
    """Prompt by prompt: 1 for a higher score, 0 for a lower, 1/2 for a tie (equal scores, or the
    same answer text). A prompt whose answer either side's reward could not score is left out
    (`excluded`), unless the two answers are the same text (a tie whatever the score)."""
    outcomes, wins, losses, ties, excluded = [], 0, 0, 0, 0
    for m, b, ma, ba in zip(model, baseline, model_answers, baseline_answers):
        if ma["output"] != ba["output"] and not (m.ok and b.ok):
            excluded += 1
            continue
        if ma["output"] == ba["output"] or math.isclose(m.score, b.score, rel_tol=0.0, abs_tol=1e-9):
            ties += 1
            outcomes.append(0.5)
        elif m.score > b.score:
            wins += 1
            outcomes.append(1.0)
        else:
            losses += 1
            outcomes.append(0.0)
    rate, se = _mean_se(outcomes)
    return {"win_rate": rate, "win_rate_se": se, "wins": wins, "losses": losses, "ties": ties, "excluded": excluded}


def summarize(prompts: list[PromptRow], answers: dict, scored: list[Scored], baseline_answers: dict | None = None,
              baseline_scored: list[Scored] | None = None) -> dict:
    """The report's numbers from the answers and their scores (both in the prompts' order)."""
    mine = [answers[p.key] for p in prompts]
    out = {"model_stats": side_stats(scored, mine), "baseline_stats": None, "win": None}
    if baseline_answers is not None and baseline_scored is not None:
        theirs = [baseline_answers[p.key] for p in prompts]
        out["baseline_stats"] = side_stats(baseline_scored, theirs)
        out["win"] = win_rate(scored, baseline_scored, mine, theirs)
    return out


def _score_fields(s: Scored) -> dict:
    out = {"score": s.score if s.ok else None, **s.extras}
    if s.cut:
        out["reward_input_cut"] = True
    if not s.ok:
        out["unscored"] = s.failed
    return out


def per_prompt(prompts: list[PromptRow], scored: list[Scored], baseline_scored: list[Scored] | None) -> list[dict]:
    """The rows of scores.json: per prompt, the model's score and numbers, and the baseline's."""
    rows = []
    for i, p in enumerate(prompts):
        r = {"key": p.key, "prompt": prompt_text(p.messages), **_score_fields(scored[i])}
        if baseline_scored is not None:
            r.update({f"baseline_{k}": v for k, v in _score_fields(baseline_scored[i]).items()})
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
# the table


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _pm(stats: dict | None) -> str:
    if not stats:
        return "-"
    se = stats.get("reward_se")
    return _fmt(stats.get("mean_reward")) + ("" if se is None else f" ± {se:.3f}")


def _extra(stats: dict | None, name: str) -> str:
    """A known share as a percentage, any other number of the reward as it is."""
    v = None if not stats else stats["extras"].get(name)
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if name in KNOWN_EXTRAS else f"{v:.3f}"


def _side_rows(row, result: dict, theirs: dict | None, mine: dict) -> None:
    """The rows with a value per side: reward, the reward's numbers, lengths, cut and unscored."""
    row("mean reward ± SE", _pm(theirs), _pm(mine))
    for k in mine["extras"]:
        row(KNOWN_EXTRAS.get(k, f"mean {k}"), *(_extra(s, k) for s in (theirs, mine)))
    row("mean length (tokens / words)",
        *(f"{_fmt(s.get('length_tokens'), '.1f')} / {_fmt(s.get('length_words'), '.1f')}" if s else "-"
          for s in (theirs, mine)))
    row("cut off by max_new_tokens",
        *("-" if not s or s.get("truncated") is None else f"{100 * s['truncated']:.0f}%" for s in (theirs, mine)))
    model_reward = not is_function_spec(str(result["reward"]))
    counts = (("reward_input_cut", "answers cut to the reward model's max length (start cut)"),
              ("unscored", "answers the reward model could not score (left out)"))
    for key, label in counts:
        if model_reward or any((s or {}).get(key) for s in (theirs, mine)):
            row(label, *("-" if not s else f"{s.get(key, 0)}" for s in (theirs, mine)))


def _win_rows(row, win: dict | None, base_name: str) -> None:
    if not win:
        return
    row(f"win rate vs {base_name} (ties ½)", "",
        f"{100 * win['win_rate']:.1f}%" + ("" if win["win_rate_se"] is None else f" ± {100 * win['win_rate_se']:.1f}"))
    row("wins / ties / losses", "", f"{win['wins']} / {win['ties']} / {win['losses']}")
    if win.get("excluded"):
        row("prompts left out of the win rate (an answer not scored)", "", f"{win['excluded']}")


def print_result(result: dict, console) -> None:
    """The report as one table, the baseline's column next to the model's."""
    from rich.table import Table

    mine, theirs = result["model_stats"], result.get("baseline_stats")
    base_name = (result.get("baseline") or {}).get("name", "baseline")
    t = Table(title=f"reward {result['reward']} on {result['data']} [{result['split']}], {result['n_prompts']} prompts")
    t.add_column("")
    if theirs is not None:
        t.add_column(f"baseline\n{base_name}", justify="right")
    t.add_column(f"model\n{result['name']}", justify="right")

    def row(label, a, b):
        t.add_row(label, *([a] if theirs is not None else []), b)

    _side_rows(row, result, theirs, mine)
    _win_rows(row, result.get("win"), base_name)
    console.print(t)
    console.print(f"results: {Path(result['output_dir']) / 'results.json'}", highlight=False)
