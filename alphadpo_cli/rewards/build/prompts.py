"""The build's prompts: the prompt splits (read, held out, de-duplicated) and their batches, the
unit of resuming and sharding."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ...config import ConfigError
from ...data import DataError
from ...integrity import json_sha256
from ...prompts import PromptRow, read_prompts
from .options import BuildOptions


def row_key(p: PromptRow) -> str:
    """The prompt and its row data: what a batch's answers and scores depend on."""
    return json_sha256([p.messages, p.extras])


def _carve_test(rows: list[PromptRow], opts: BuildOptions) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, test): a prompt is test by a hash of (seed, prompt) for a fraction (stable when more
    prompts are added), or one of a seeded sample of `test_size` prompts."""
    if opts.test_fraction is not None:
        test = {i for i, r in enumerate(rows)
                if int(json_sha256([opts.seed, r.messages]), 16) / 16 ** 16 < opts.test_fraction}
    else:
        if opts.test_size >= len(rows):
            raise ConfigError(f"--test-size {opts.test_size} leaves no training prompts (there are {len(rows)})")
        test = set(random.Random(opts.seed).sample(range(len(rows)), opts.test_size))
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def _dedupe(rows: list[PromptRow], seen: set[str]) -> tuple[list[PromptRow], int]:
    out = []
    for r in rows:
        k = json_sha256(r.messages)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out, len(rows) - len(out)


def load_prompt_splits(opts: BuildOptions) -> tuple[dict[str, list[PromptRow]], dict[str, Any]]:
    """({split: prompts}, {sources, duplicates dropped}); the same prompt twice is answered once,
    and a training prompt that is also a test prompt is dropped from train."""
    train, source = read_prompts(opts.dataset, opts.split, prompt_field=opts.prompt_field,
                                 max_prompts=opts.max_prompts)
    sources = {"train": source}
    test: list[PromptRow] = []
    if opts.test_split or opts.test_dataset:
        test, sources["test"] = read_prompts(opts.test_dataset or opts.dataset, opts.test_split or "test",
                                             prompt_field=opts.prompt_field, max_prompts=opts.max_prompts)
    elif opts.test_fraction is not None or opts.test_size is not None:
        train, test = _carve_test(train, opts)
        held = f"fraction {opts.test_fraction:g}" if opts.test_fraction is not None else opts.test_size
        sources["test"] = f"{source} (held out: {held})"
    seen: set[str] = set()
    test, dup_test = _dedupe(test, seen)
    train, dup_train = _dedupe(train, seen)
    splits = {"train": train, **({"test": test} if test else {})}
    if not train:
        raise DataError(f"{source}: no training prompts left")
    return splits, {"sources": sources, "duplicates": {"train": dup_train, "test": dup_test}}


@dataclass
class Batch:
    id: str  # "<split>/<n>": also the sampling seed's key
    split: str
    rows: list[PromptRow]
    order: int  # position over all splits: which shard takes it

    @property
    def hash(self) -> str:
        return json_sha256([row_key(r) for r in self.rows])


def make_batches(splits: dict[str, list[PromptRow]], batch_size: int) -> list[Batch]:
    out = []
    for split, rows in splits.items():
        for n, start in enumerate(range(0, len(rows), batch_size)):
            out.append(Batch(f"{split}/{n}", split, rows[start:start + batch_size], len(out)))
    return out
