"""A programmatic reward for verifiable instructions (IFEval-style), pure Python, no dependencies.

A constraint is a short string, ``name`` or ``name:argument``, that is stored with every row of
the demo dataset, so any row can be re-scored from the row alone:

    max_words:N        the answer has at most N words
    lowercase          no uppercase letters (and at least one letter)
    include_word:W     the word W appears (whole word, any case)
    bullets:K          exactly K bullet lines ("- ", "* " or "• "), and nothing but bullets
    end_with:PHRASE    the answer ends with PHRASE (any case; trailing whitespace ignored)
    no_commas          no ',' anywhere

`score_response` = fraction of constraints satisfied + a small brevity tie-break (at most
`TIE_BREAK`, smaller than one constraint's share, so it only orders answers that satisfy the
same number of constraints). An answer cut off by the token budget gets no tie-break; an empty
answer, or one that only repeats the prompt, scores 0.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

__all__ = [
    "CONSTRAINT_NAMES",
    "TIE_BREAK",
    "BREVITY_CAP_WORDS",
    "brevity",
    "check",
    "constraint_score",
    "count_bullets",
    "count_words",
    "describe",
    "is_echo",
    "parse",
    "reward",
    "score_response",
]

TIE_BREAK = 0.1
BREVITY_CAP_WORDS = 60

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_BULLET_RE = re.compile(r"^\s*(?:[-*•])\s+\S")


def count_words(text: str) -> int:
    return len(_WORD_RE.findall(text))


def count_bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if _BULLET_RE.match(line))


def _max_words(text: str, arg: str) -> bool:
    return count_words(text) <= int(arg)


def _lowercase(text: str, arg: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def _include_word(text: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(arg)}(?![A-Za-z0-9])", text, re.I) is not None


def _bullets(text: str, arg: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) == int(arg) and all(_BULLET_RE.match(line) for line in lines)


def _end_with(text: str, arg: str) -> bool:
    return text.rstrip().lower().endswith(arg.strip().lower())


def _no_commas(text: str, arg: str) -> bool:
    return "," not in text


_CHECKS: dict[str, tuple[Callable[[str, str], bool], bool]] = {
    # name: (check, takes an argument)
    "max_words": (_max_words, True),
    "lowercase": (_lowercase, False),
    "include_word": (_include_word, True),
    "bullets": (_bullets, True),
    "end_with": (_end_with, True),
    "no_commas": (_no_commas, False),
}
CONSTRAINT_NAMES = tuple(_CHECKS)


def parse(constraint: str) -> tuple[str, str]:
    """'max_words:20' -> ('max_words', '20'); 'lowercase' -> ('lowercase', '')."""
    name, _, arg = constraint.partition(":")
    if name not in _CHECKS:
        raise ValueError(f"unknown constraint {constraint!r}; known: {', '.join(_CHECKS)}")
    needs_arg = _CHECKS[name][1]
    if needs_arg and not arg:
        raise ValueError(f"constraint {name!r} needs an argument: {name}:<value>")
    if not needs_arg and arg:
        raise ValueError(f"constraint {name!r} takes no argument")
    if name in ("max_words", "bullets") and not (arg.isdigit() and int(arg) > 0):
        raise ValueError(f"constraint {name!r} needs a positive integer, got {arg!r}")
    return name, arg


def check(text: str, constraint: str) -> bool:
    name, arg = parse(constraint)
    return _CHECKS[name][0](text, arg)


def describe(constraint: str) -> str:
    """The instruction sentence shown to the model for a constraint."""
    name, arg = parse(constraint)
    return {
        "max_words": lambda: f"Answer in at most {arg} words.",
        "lowercase": lambda: "Write your whole answer in lowercase letters only.",
        "include_word": lambda: f'Include the word "{arg}" in your answer.',
        "bullets": lambda: (
            f'Answer as a bulleted list with exactly {arg} bullet points, each starting with "- ".'
        ),
        "end_with": lambda: f'End your answer with the exact phrase "{arg}".',
        "no_commas": lambda: "Do not use any commas.",
    }[name]()


def constraint_score(text: str, constraints: Iterable[str]) -> float:
    """Fraction of constraints satisfied (1.0 for an empty list)."""
    constraints = list(constraints)
    if not constraints:
        return 1.0
    return sum(check(text, c) for c in constraints) / len(constraints)


def brevity(text: str) -> float:
    """1.0 for an empty answer, falling linearly to 0.0 at BREVITY_CAP_WORDS words and beyond."""
    return max(0.0, 1.0 - count_words(text) / BREVITY_CAP_WORDS)


def _normalise(text: str) -> str:
    return " ".join(_WORD_RE.findall(text.lower()))


def is_echo(text: str, prompt: str) -> bool:
    """True when the answer only repeats (part of) the prompt: that is no answer at all."""
    norm = _normalise(text)
    return not norm or norm in _normalise(prompt)


def score_response(
    text: str, constraints: Iterable[str], *, finished: bool = True, prompt: str | None = None
) -> float:
    """Constraint fraction + TIE_BREAK * brevity (the tie-break only for finished answers).

    An empty answer, or (given `prompt`) one that merely echoes the prompt, scores 0.
    """
    if not text.strip() or (prompt is not None and is_echo(text, prompt)):
        return 0.0
    base = constraint_score(text, constraints)
    return base + (TIE_BREAK * brevity(text) if finished else 0.0)


def reward(prompt: str, response: str, row: dict) -> dict:
    """`alphadpo_cli.rewards` entry point (``examples/verifiable_reward.py:reward``): the demo's score
    of one answer, and what `alphadpo eval reward` reports for verifiable rows: the share of the
    row's constraints the answer satisfies, and whether it satisfies all of them."""
    constraints = list(row.get("constraints") or [])
    satisfied = constraint_score(response, constraints) if constraints else 0.0
    return {
        "score": score_response(response, constraints, finished=bool(row.get("finished", True)), prompt=prompt),
        "constraints_satisfied": satisfied,
        "all_constraints_satisfied": float(bool(constraints) and satisfied == 1.0),
    }
