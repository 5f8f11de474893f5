"""What makes a score, and what makes an answer: identities that decide whether saved scores and
answers may be reused.

* `reward_identity`: a function reward's name and its file's content; a reward model's name, the
  name, size and content hash of its local weight files, and how it is run (dtype, length and
  how a longer input is cut, remote code). An edited reward function, or a reward model trained
  again in the same directory, never reuses the old scores; a touched or copied one does.
* `weights_fingerprint`: the weight files of local models and adapters, by content.
* `check_reward_early`: a reward's problems before any model loads. A function reward is loaded
  (it is cheap); a reward model is only resolved (local path, or a hub id the cache or the hub
  knows): it loads after the generation, when the GPU is free.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..config import ConfigError
from ..integrity import content_sha256, file_sha256, json_sha256
from ..models.sources import local_weight_files
from . import Reward, is_function_spec, load_reward

__all__ = ["reward_identity", "weights_fingerprint", "check_reward_early", "identity_hash"]


def weights_fingerprint(*refs: str | None) -> list:
    """Name, size and SHA-256 of the weight and config files of local models/adapters
    (`models.sources.local_weight_files`, the files `weights_identity` keys caches by; `content_sha256`:
    each file read once, then remembered by its stamp; a touched file keeps its fingerprint). Hub
    ids and packaged files give nothing: they are named by their source."""
    out = []
    for ref in refs:
        path = Path(ref).expanduser() if ref and not str(ref).startswith("pkg:") else None
        if path is None or not path.exists():
            continue
        files = local_weight_files(path)
        out.extend([p.name, p.stat().st_size, content_sha256(p)[:16]] for p in files)
    return out


def _file_sha(path: str | None) -> str | None:
    return file_sha256(Path(path))[:16] if path and Path(path).is_file() else None


def reward_identity(spec: str, *, dtype: str = "auto", max_length: int = 4096,
                    trust_remote_code: bool = False) -> dict:
    """What makes the scores of the reward named `spec` (see the module docstring)."""
    if is_function_spec(spec):
        target, _, attr = spec.rpartition(":")
        if target.endswith(".py"):
            origin = target
        else:
            try:
                found = importlib.util.find_spec(target)
            except (ImportError, ValueError):
                found = None
            origin = getattr(found, "origin", None)
        return {"function": f"{Path(target).name if target.endswith('.py') else target}:{attr}",
                "sha256": _file_sha(origin)}
    out = {"model": spec, "dtype": dtype, "max_length": max_length, "cut": "prompt_from_the_left",
           "trust_remote_code": trust_remote_code}
    weights = weights_fingerprint(spec)
    if weights:
        out["weights"] = weights
    return out


def identity_hash(identity: dict) -> str:
    return json_sha256(identity)


def check_reward_early(spec: str | None) -> Reward | None:
    """The function reward of `spec`, loaded; None for a reward model once its name resolves."""
    if not spec:
        raise ConfigError("give --reward: 'module:function', 'path/file.py:function' or a reward model")
    if is_function_spec(spec):
        return load_reward(spec)
    from ..models.sources import resolve_model_source

    resolve_model_source(spec, check_hub=True)
    return None
