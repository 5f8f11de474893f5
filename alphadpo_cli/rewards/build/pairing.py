"""The pairing rule, as pure functions: one prompt's scored answers in, (chosen, rejected) pairs
and the pairs not made (by reason) out, and a pair as the row `train.jsonl` holds.

* Empty answers and answers without a score (a reward model could not score them) take no part.
* `best-worst`: the best answer against the worst other one; `best-random`: against a random
  other one (the caller seeds the generator per prompt); `all-pairs`: every two answers, the
  better one chosen.
* With `chosen_must_finish` a chosen answer must have ended on its own (not cut off by the token
  budget); the best-* strategies then choose the best finished answer.
* Identical texts, equal scores and a score gap not above `min_gap` make no pair.
* The first of equal best (worst) answers is taken.
* `score_decimals` rounds the written scores (only the written ones: pairing uses the full values).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ...config import ConfigError
from ...prompts import PromptRow

STRATEGIES = ("best-worst", "all-pairs", "best-random")
DROP_REASONS = {
    "too_few_answers": "fewer than two non-empty, scored answers",
    "no_finished_answer": "no answer ended on its own (a chosen answer must)",
    "identical": "chosen and rejected texts identical",
    "tie": "equal scores",
    "small_gap": "score gap not above --min-gap",
    "unfinished_chosen": "the better answer was cut off by the token budget",
}


@dataclass
class Candidate:
    text: str
    score: float | None  # None: the reward model could not score it (it takes no part in a pair)
    finished: bool = True
    tokens: int = 0


Pair = tuple[Candidate, Candidate]


def _why_not(chosen: Candidate, rejected: Candidate, min_gap: float) -> str | None:
    if chosen.text.strip() == rejected.text.strip():
        return "identical"
    if chosen.score == rejected.score:
        return "tie"
    if chosen.score < rejected.score:  # only when the better answers were all cut off
        return "unfinished_chosen"
    if chosen.score - rejected.score <= min_gap:
        return "small_gap"
    return None


def _all_pairs(valid: list[Candidate], min_gap: float, chosen_must_finish: bool) -> tuple[list[Pair], Counter]:
    pairs, drops = [], Counter()
    for a, b in itertools.combinations(valid, 2):
        hi, lo = (a, b) if a.score >= b.score else (b, a)
        reason = _why_not(hi, lo, min_gap)
        if reason is None and chosen_must_finish and not hi.finished:
            reason = "unfinished_chosen"
        if reason is None:
            pairs.append((hi, lo))
        else:
            drops[reason] += 1
    return pairs, drops


def _best_against_one(valid: list[Candidate], strategy: str, min_gap: float, chosen_must_finish: bool,
                      rng: random.Random | None) -> tuple[list[Pair], Counter]:
    eligible = [i for i, c in enumerate(valid) if c.finished or not chosen_must_finish]
    if not eligible:
        return [], Counter(no_finished_answer=1)
    best = max(eligible, key=lambda i: valid[i].score)
    others = [i for i in range(len(valid)) if i != best]
    if strategy == "best-worst":
        other = min(others, key=lambda i: valid[i].score)
    else:
        other = (rng or random.Random(0)).choice(others)
    reason = _why_not(valid[best], valid[other], min_gap)
    if reason is not None:
        return [], Counter({reason: 1})
    return [(valid[best], valid[other])], Counter()


def binarise(candidates: Sequence[Candidate], strategy: str = "best-worst", *, min_gap: float = 0.0,
             chosen_must_finish: bool = True, rng: random.Random | None = None) -> tuple[list[Pair], Counter]:
    """(chosen, rejected) pairs of one prompt's answers, and the pairs not made, by reason (the
    rule in the module docstring). `rng` draws the other answer of `best-random`."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{strategy}' ({', '.join(STRATEGIES)})")
    valid = [c for c in candidates if c.text.strip() and c.score is not None]
    if len(valid) < 2:
        return [], Counter(too_few_answers=1)
    if strategy == "all-pairs":
        return _all_pairs(valid, min_gap, chosen_must_finish)
    return _best_against_one(valid, strategy, min_gap, chosen_must_finish, rng)


def candidates(answers: list, scores: list[float | None]) -> list[Candidate]:
    """A prompt's candidates from its work records: answers as [text, tokens, finish reason]."""
    return [Candidate(text, None if s is None else float(s), finish == "stop", tokens)
            for (text, tokens, finish), s in zip(answers, scores)]


def pair_row(p: PromptRow, chosen: Candidate, rejected: Candidate, cands: list[Candidate], *,
             score_decimals: int | None = None, keep_all: bool = False) -> dict:
    """A pair as an UltraFeedback-binarized row: the prompt (its text when it is one user turn,
    else its messages), chosen and rejected message lists, their scores, with `keep_all` every
    answer and score, then the prompt row's other fields."""
    rnd = (lambda x: round(x, score_decimals)) if score_decimals is not None else float
    single = len(p.messages) == 1 and p.messages[0]["role"] == "user"
    row = {"prompt": p.messages[0]["content"] if single else p.messages,
           "chosen": [*p.messages, {"role": "assistant", "content": chosen.text}],
           "rejected": [*p.messages, {"role": "assistant", "content": rejected.text}],
           "score_chosen": rnd(chosen.score), "score_rejected": rnd(rejected.score)}
    if keep_all:
        row["all_generated_responses"] = [x.text for x in cands]
        row["all_rm_scores"] = [None if x.score is None else rnd(x.score) for x in cands]
    row.update(p.extras)
    return row
