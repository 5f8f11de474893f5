"""Scores already given, so that a rerun of `alphadpo eval reward` scores only what is new.

A score is kept by the identity of the reward that gave it (`rewards.identity.reward_identity`: a
function's file content; a reward model's name, weights, dtype, length and cut) and by the content
of what was scored (prompt, row data, answer text, finished). The scores of one reward are one
work log (`artefacts.WorkLog`, the reward identity in its header), a file per reward under the
output directory:

    score_cache/<the first 16 hex digits of the identity's hash>.jsonl

One log per reward rather than one for all: a log holds one identity, and another reward (an
edited function, a retrained reward model) is not an error to refuse but a reward whose scores
are not there yet, so it gets its own log and scores everything again; the logs of rewards used
before stay, and going back to one of them scores nothing again.

`score_cache.jsonl`, the single header-less log of earlier versions (a reward hash in each
record), stays usable: when a reward's log is first made, that file's records of this reward are
copied into it. The old file is only read (it may hold other rewards' scores) and never written.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..artefacts import WorkLog, read_lines
from ..config import ConfigError
from ..data import DataError
from ..integrity import json_sha256
from ..prompts import PromptRow
from . import Reward, RewardItem, Scored, checked_scores
from .identity import identity_hash

__all__ = ["ScoreCache", "score_sides", "item_key", "LEGACY_FILE"]

KIND = "reward-score cache"
LEGACY_FILE = "score_cache.jsonl"  # before work logs had headers: every reward's scores in one file


def item_key(item: RewardItem) -> str:
    """What a score depends on besides the reward: the prompt, the row data, the answer, finished."""
    return json_sha256([item.prompt, item.row, item.response, item.finished], 24)


def _scored_of(rec: dict) -> Scored | None:
    """A record's score; None for one that is not usable (a non-finite score of an older version).
    A reward model's item that it could not score is kept as such (`failed`, no score)."""
    cut = bool(rec.get("cut", False))
    if isinstance(rec.get("failed"), str):
        return Scored(math.nan, {}, cut, rec["failed"])
    score, extras = rec.get("score"), rec.get("extras") or {}
    numbers = [score, *extras.values()] if isinstance(extras, dict) else [None]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        return Scored(float(score), {k: float(v) for k, v in extras.items()}, cut)
    return None


def _record(key: str, sc: Scored) -> dict:
    rec = {"key": key, "score": sc.score if sc.ok else None, "extras": sc.extras}
    if sc.cut:
        rec["cut"] = True
    if not sc.ok:
        rec["failed"] = sc.failed
    return rec


class ScoreCache:
    """The scores one reward (by its identity) gave, by `item_key`, in `<out_dir>/score_cache/`."""

    def __init__(self, out_dir: str | Path, identity: dict):
        out_dir = Path(out_dir)
        self.reward = identity_hash(identity)
        self.path = out_dir / "score_cache" / f"{self.reward[:16]}.jsonl"
        new = not self.path.is_file()
        self.log = WorkLog(self.path, identity, kind=KIND, hint=f"delete {self.path} to score everything again")
        if new:
            self._adopt(out_dir / LEGACY_FILE)
        self.known: dict[str, Scored] = {}
        for rec in self.log.records:
            scored = _scored_of(rec) if isinstance(rec.get("key"), str) else None
            if scored is not None:
                self.known[rec["key"]] = scored

    def _adopt(self, legacy: Path) -> None:
        """This reward's records of the header-less log of earlier versions, copied into its log."""
        old = [{k: v for k, v in rec.items() if k != "reward"} for rec in read_lines(legacy)
               if isinstance(rec, dict) and rec.get("reward") == self.reward and isinstance(rec.get("key"), str)]
        if old:
            self.log.extend(old)

    def add(self, pairs: list[tuple[str, Scored]]) -> None:
        """Keep these (item key, score) pairs: on disk when this returns."""
        self.log.extend(_record(key, sc) for key, sc in pairs)
        self.known.update(pairs)

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> "ScoreCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _item(p: PromptRow, answer: dict, label: str = "") -> RewardItem:
    where = f"{p.where}, the answer of {label}" if label else p.where
    return RewardItem(p.messages, answer["output"], p.extras, answer.get("finish") != "length", where)


def _score(reward: Reward, items: list[RewardItem], label: str) -> list[Scored]:
    """`reward.score(items)`, its failures turned into an error that names the reward and the side."""
    try:
        scored = reward.score(items)
    except (ConfigError, DataError):
        raise
    except Exception as exc:
        raise ConfigError(f"reward '{reward.name}' failed while scoring the answers of {label}: "
                          f"{type(exc).__name__}: {exc}") from None
    return checked_scores(reward, items, scored)


def score_sides(sides: list[tuple[str, dict]], prompts: list[PromptRow], get_reward, cache: ScoreCache
                ) -> tuple[list[list[Scored]], dict]:
    """The scores of every side's answers (label, answers) in the prompts' order: the cached ones
    reused, the rest scored by `get_reward()` (called only if something is missing) and cached."""
    items = [[_item(p, answers[p.key], label) for p in prompts] for label, answers in sides]
    keys = [[item_key(it) for it in its] for its in items]
    missing: dict[str, tuple[int, RewardItem]] = {}  # item key -> (the first side that needs it, item)
    for side, (its, ks) in enumerate(zip(items, keys)):
        for it, k in zip(its, ks):
            if k not in cache.known:
                missing.setdefault(k, (side, it))
    reused = sum(1 for ks in keys for k in ks if k in cache.known)
    if missing:
        reward = get_reward()
        for side, (label, _) in enumerate(sides):
            mine = [k for k, (s, _) in missing.items() if s == side]
            if mine:
                cache.add(list(zip(mine, _score(reward, [missing[k][1] for k in mine], label))))
    out = [[cache.known[k] for k in ks] for ks in keys]
    return out, {"scored": len(missing), "reused": reused}
