"""The reward interface: what is scored (`RewardItem`), what comes back (`Scored`), and a Python
function as a reward (`FunctionReward`). See the package docstring for the function's signature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..config import ConfigError


@dataclass
class RewardItem:
    """One (prompt, response) pair to score. `prompt`: chat messages ending before the answer."""

    prompt: list[dict]
    response: str
    row: Mapping[str, Any] = field(default_factory=dict)
    finished: bool = True


@dataclass
class Scored:
    score: float
    extras: dict[str, float] = field(default_factory=dict)


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


def _as_scored(value: Any, where: str) -> Scored:
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ConfigError(f"{where} returned a mapping without 'score': {sorted(value)}")
        extras = {str(k): float(v) for k, v in value.items() if k != "score"}
        return Scored(float(value["score"]), extras)
    try:
        return Scored(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{where} returned {type(value).__name__}, not a number or a mapping with 'score'") from None


class FunctionReward(Reward):
    """A Python function as a reward (see the module docstring for its signature)."""

    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn, self.name = fn, name

    def score(self, items: Sequence[RewardItem]) -> list[Scored]:
        return [_as_scored(self.fn(prompt_text(it.prompt), it.response, {**it.row, "finished": it.finished}), self.name)
                for it in items]
