"""Rewards: score (prompt, response) pairs in batches.

One interface, two kinds:

* a Python function, named ``module:function`` or ``path/file.py:function``
  (e.g. ``examples/verifiable_reward.py:reward``), called once per item as
  ``fn(prompt, response, row)``: `prompt` the text of the prompt's user turns, `response` the
  answer's text, `row` the source row's fields (e.g. a verifiable row's ``constraints``) plus
  ``finished`` (False when the answer was cut off by the token budget). It returns a finite
  number, or a mapping with a finite ``"score"`` and further finite numbers (reported as their
  means, e.g. a verifiable reward's share of constraints satisfied); anything else (NaN, an
  infinity, a string) is an error that names the function, the row and the prompt;
* a Hugging Face reward model (`HFRewardModel`): ``AutoModelForSequenceClassification`` or a model
  with its own code (ArmoRM: ``trust_remote_code``, its ``score`` output), batched and sorted by
  length, bf16 where the device supports it, each pair rendered with the reward model's own chat
  template (never the policy's). An input longer than its max length is cut from the left (the
  end of the answer is what the head reads) and marked ``cut``; an item it scores NaN or infinite
  is marked ``failed``: the callers leave it out, and both are counted in their reports.

`load_reward(spec)` returns the one or the other. The on-policy data builder
(`alphadpo data build`) and `alphadpo eval reward` score through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ..config import ConfigError
from .base import FunctionReward, Reward, RewardItem, Scored, checked_scores, prompt_text

__all__ = ["RewardItem", "Scored", "Reward", "FunctionReward", "HFRewardModel", "load_reward", "prompt_text",
           "is_function_spec", "checked_scores"]


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


def is_function_spec(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr.isidentifier() and (target.endswith(".py") or "/" not in target)
                and not Path(spec).exists())


def load_reward(spec: str, *, device=None, dtype: str = "auto", batch_size: int = 8, max_length: int = 4096,
                trust_remote_code: bool = False) -> Reward:
    """A reward from its name: ``module:function`` / ``file.py:function``, else a reward model
    (local directory or hub id)."""
    if not spec:
        raise ConfigError("give a reward: 'module:function', 'path/file.py:function' or a reward model")
    if is_function_spec(spec):
        return _load_function(spec)
    from .hf import HFRewardModel

    return HFRewardModel(spec, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                         trust_remote_code=trust_remote_code)


def __getattr__(name):  # HFRewardModel pulls in torch/transformers: only when asked for
    if name == "HFRewardModel":
        from .hf import HFRewardModel

        return HFRewardModel
    raise AttributeError(name)
