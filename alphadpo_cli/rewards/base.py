"""The reward interface: what is scored (`RewardItem`), what comes back (`Scored`), and a Python
function as a reward (`FunctionReward`). See the package docstring for the function's signature.

A score is a finite real number. A function reward that returns anything else (NaN, an
infinity, a string, None) is refused with an error naming the function, the row and the prompt
(`as_scored`): such a score cannot be averaged or ranked, and a bug in the function must not
become a result. A reward model that cannot score an item (a non-finite output) marks it
`failed`: the callers leave the item out, count it and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..config import ConfigError


@dataclass
class RewardItem:
    """One (prompt, response) pair to score. `prompt`: chat messages ending before the answer.
    `where` names the item in messages (e.g. "prompts.jsonl, row 3"); it is not part of a score."""

    prompt: list[dict]
    response: str
    row: Mapping[str, Any] = field(default_factory=dict)
    finished: bool = True
    where: str = ""


@dataclass
class Scored:
    """A score, the reward's further numbers, and what happened on the way: `cut` when a reward
    model's input was longer than its max length and its start was cut off (the end of the answer
    and the template's final tokens are kept); `failed` (why) when a reward model could not score
    the item, whose `score` is then NaN and must not be used."""

    score: float
    extras: dict[str, float] = field(default_factory=dict)
    cut: bool = False
    failed: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None


class Reward:
    """What every reward does: `score(items) -> [Scored]`, in the items' order."""

    name: str = "reward"

    def score(self, items: Sequence[RewardItem]) -> list[Scored]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (a function reward holds none)."""


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the user turns of a chat prompt (what a function reward reads)."""
    return "\n\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")


def describe_item(item: RewardItem) -> str:
    """The item for a message: its row and the start of its prompt."""
    text = prompt_text(item.prompt)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{item.where or 'an item'} (prompt {text!r})"


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None when it is not a finite real number (str, None, NaN,
    an infinity). Numbers of any kind (bool, numpy, a 0-d tensor) count."""
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def as_scored(value: Any, name: str, item: RewardItem) -> Scored:
    """The return value of reward function `name` for `item` as a `Scored`; anything but a finite
    number (or a mapping with a finite "score" and finite numbers besides) is refused, naming the
    function, the row and the prompt."""
    def refuse(what: str) -> ConfigError:
        return ConfigError(f"reward '{name}' returned {what} for {describe_item(item)}: a reward must return a "
                           "finite number, or a mapping with a finite 'score' (and finite numbers besides). "
                           "NaN or an infinity cannot be averaged or ranked; fix the function")

    if isinstance(value, Mapping):
        if "score" not in value:
            raise ConfigError(f"reward '{name}' returned a mapping without 'score' ({sorted(map(str, value))}) "
                              f"for {describe_item(item)}")
        score = _number(value["score"])
        if score is None:
            raise refuse(f"score {value['score']!r}")
        extras = {}
        for k, v in value.items():
            if k != "score":
                extras[str(k)] = _number(v)
                if extras[str(k)] is None:
                    raise refuse(f"{k}={v!r}")
        return Scored(score, extras)
    score = _number(value)
    if score is None:
        raise refuse(f"{value!r}" if isinstance(value, (float, int)) else f"{type(value).__name__} {value!r:.60}"
                     + ", not a number")
    return Scored(score)


class FunctionReward(Reward):
    """A Python function as a reward (see the module docstring for its signature)."""

    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn, self.name = fn, name

    def score(self, items: Sequence[RewardItem]) -> list[Scored]:
        return [as_scored(self.fn(prompt_text(it.prompt), it.response, {**it.row, "finished": it.finished}),
                          self.name, it)
                for it in items]


def checked_scores(reward: Reward, items: Sequence[RewardItem], scored: Sequence[Scored]) -> list[Scored]:
    """`scored` for `items`, after checking what any reward returns: one per item, and each a
    finite score with finite extras unless marked `failed` (a reward model's item it could not
    score). Anything else is refused naming the reward, the row and the prompt."""
    scored = list(scored)
    if len(scored) != len(items):
        raise ConfigError(f"reward '{reward.name}' returned {len(scored)} scores for {len(items)} answers")
    for item, s in zip(items, scored):
        if not isinstance(s, Scored):
            raise ConfigError(f"reward '{reward.name}' returned {type(s).__name__} for {describe_item(item)}, "
                              "not a Scored")
        if s.failed is not None:
            continue
        bad = [f"score {s.score!r}"] if _number(s.score) is None else []
        bad += [f"{k}={v!r}" for k, v in s.extras.items() if _number(v) is None]
        if bad:
            raise ConfigError(f"reward '{reward.name}' gave {', '.join(bad)} for {describe_item(item)}: scores must "
                              "be finite numbers")
    return scored
