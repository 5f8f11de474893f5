"""The prompts of an experiment: the training prompts cut into one slice per round, and the
held-out prompts the rounds are judged on, never trained on (an overlap is refused). Each slice
and the held-out set are written as prompt files (`{"prompt": messages, ...row fields}`) that
`data build` and `eval reward` read back as the same prompts, with the same row data."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..integrity import json_sha256
from ..io import atomic_write_text
from ..prompts import PromptRow, read_prompts
from .options import IterateOptions


@dataclass
class PromptPlan:
    slices: list[list[PromptRow]]  # slices[k - 1]: round k's prompts
    heldout: list[PromptRow]
    source: str
    dropped_duplicates: int

    def fingerprint(self) -> dict:
        """What the rounds' prompts are: part of the run's identity."""
        return {"slices": [json_sha256([[p.messages, p.extras] for p in s]) for s in self.slices],
                "heldout": json_sha256([[p.messages, p.extras] for p in self.heldout])}

    @property
    def all_training(self) -> list[PromptRow]:
        """Every prompt the rounds sample on, each once (the offline round's prompts)."""
        seen, out = set(), []
        for s in self.slices:
            for p in s:
                if p.key not in seen:
                    seen.add(p.key)
                    out.append(p)
        return out


def _dedupe(rows: list[PromptRow]) -> tuple[list[PromptRow], int]:
    seen, out = set(), []
    for r in rows:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out, len(rows) - len(out)


def _carve(rows: list[PromptRow], opts: IterateOptions) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held out): a seeded sample of `heldout_size` prompts, or each prompt held out by a
    hash of (seed, prompt) for a fraction (stable when prompts are added)."""
    seed = opts.sampling.seed if opts.sampling.seed is not None else 42
    if opts.heldout_fraction is not None:
        held = {i for i, r in enumerate(rows)
                if int(json_sha256([seed, r.messages]), 16) / 16 ** 16 < opts.heldout_fraction}
    else:
        if opts.heldout_size >= len(rows):
            raise ConfigError(f"--heldout-size {opts.heldout_size} leaves no training prompts "
                              f"(there are {len(rows)})")
        held = set(random.Random(seed).sample(range(len(rows)), opts.heldout_size))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _check_no_overlap(train: list[PromptRow], heldout: list[PromptRow], where: str) -> None:
    keys = {p.key for p in train}
    shared = [p for p in heldout if p.key in keys]
    if shared:
        raise ConfigError(f"{len(shared)} held-out prompt(s) ({where}) are also training prompts, e.g. "
                          f"{shared[0].where}: {json.dumps(shared[0].messages[-1]['content'])[:80]}; the held-out "
                          "prompts must never be trained on: remove them from the training prompts, or carve the "
                          "held-out prompts out with --heldout-size/--heldout-fraction")


def slice_prompts(train: list[PromptRow], opts: IterateOptions) -> list[list[PromptRow]]:
    """Round k's prompts: disjoint consecutive slices, or the same first slice every round."""
    n, rounds = len(train), opts.rounds
    per = opts.prompts_per_round or (n if opts.reuse_prompts else n // rounds)
    need = per if opts.reuse_prompts else per * rounds
    if per < 1 or need > n:
        asked = (f"{rounds} rounds x {per} prompts per round" if opts.prompts_per_round
                 else f"{rounds} rounds of at least one prompt each")
        raise ConfigError(f"{n} training prompt(s) are too few for {asked} ({max(need, rounds)} needed): give more "
                          "prompts, fewer --rounds or a smaller --prompts-per-round, or --reuse-prompts")
    if opts.reuse_prompts:
        return [train[:per] for _ in range(rounds)]
    return [train[k * per:(k + 1) * per] for k in range(rounds)]


def plan_prompts(opts: IterateOptions) -> PromptPlan:
    """Read, hold out, check and slice (bad rows, too few prompts or an overlap: one ConfigError/
    DataError, before any model loads)."""
    train, source = read_prompts(opts.prompts, opts.split, prompt_field=opts.prompt_field,
                                 max_prompts=opts.max_prompts)
    train, dropped = _dedupe(train)
    if opts.heldout_split or opts.heldout_dataset:
        data, split = opts.heldout_dataset or opts.prompts, opts.heldout_split or "test"
        heldout, held_source = read_prompts(data, split, prompt_field=opts.prompt_field)
        _check_no_overlap(train, heldout, held_source)
    else:
        train, heldout = _carve(train, opts)
    heldout, _ = _dedupe(heldout)
    if not heldout:
        raise ConfigError("no held-out prompts: raise --heldout-fraction, or give --heldout-size/--heldout-split")
    return PromptPlan(slice_prompts(train, opts), heldout, source, dropped)


def as_row(p: PromptRow) -> dict:
    """A prompt as a row the prompt reader gives back unchanged (messages and row data)."""
    return {"prompt": p.messages, **p.extras}


def write_prompt_file(path: Path, rows: list[PromptRow]) -> Path:
    """`rows` as JSONL at `path`, written atomically (identical bytes on every rerun)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(as_row(p), ensure_ascii=False, sort_keys=True) + "\n" for p in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path
