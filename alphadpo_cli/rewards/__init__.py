"""Rewards: score (prompt, response) pairs in batches.

One interface, two kinds:

* a Python function, named ``module:function`` or ``path/file.py:function``
  (e.g. ``examples/verifiable_reward.py:reward``), called once per item as
  ``fn(prompt, response, row)``: `prompt` the text of the prompt's user turns, `response` the
  answer's text, `row` the source row's fields (e.g. a verifiable row's ``constraints``) plus
  ``finished`` (False when the answer was cut off by the token budget). It returns a number, or
  a mapping with ``"score"`` and further numeric fields (reported as their means, e.g. a
  verifiable reward's share of constraints satisfied);
* a Hugging Face reward model (`HFRewardModel`): ``AutoModelForSequenceClassification`` or a model
  with its own code (ArmoRM: ``trust_remote_code``, its ``score`` output), batched and sorted by
  length, bf16 where the device supports it, each pair rendered with the reward model's own chat
  template (never the policy's).

`load_reward(spec)` returns the one or the other. The on-policy data builder
(`alphadpo data build`) and `alphadpo eval reward` score through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import ConfigError

__all__ = ["RewardItem", "Scored", "Reward", "FunctionReward", "HFRewardModel", "load_reward", "prompt_text"]


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


def _load_function(spec: str) -> FunctionReward:
    target, _, attr = spec.rpartition(":")
    path = Path(target).expanduser()
    if target.endswith(".py"):
        if not path.is_file():
            raise ConfigError(f"reward '{spec}': no file {path}")
        name = f"alphadpo_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"reward '{spec}': cannot import module '{target}' ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward '{spec}': '{target}' has no function '{attr}'")
    return FunctionReward(fn, spec)


def _is_function_spec(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr.isidentifier() and (target.endswith(".py") or "/" not in target)
                and not Path(spec).exists())


def load_reward(spec: str, *, device=None, dtype: str = "auto", batch_size: int = 8, max_length: int = 4096,
                trust_remote_code: bool = False) -> Reward:
    """A reward from its name: ``module:function`` / ``file.py:function``, else a reward model
    (local directory or hub id)."""
    if not spec:
        raise ConfigError("give a reward: 'module:function', 'path/file.py:function' or a reward model")
    if _is_function_spec(spec):
        return _load_function(spec)
    from .hf import HFRewardModel

    return HFRewardModel(spec, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                         trust_remote_code=trust_remote_code)


def __getattr__(name):  # HFRewardModel pulls in torch/transformers: only when asked for
    if name == "HFRewardModel":
        from .hf import HFRewardModel

        return HFRewardModel
    raise AttributeError(name)
