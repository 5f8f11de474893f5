"""The last phase: once every batch (of every shard) has answers and scores, pair each prompt's
answers and write train.jsonl / test.jsonl and build.json."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...config import ConfigError
from ...io import atomic_write_json, atomic_write_text
from .options import WORK_FORMAT, BuildOptions, BuildSummary
from .pairing import DROP_REASONS, binarise, candidates, pair_row
from .phases import BuildContext
from .prompts import Batch, row_key
from .report import describe, mean4, throughput, versions


@dataclass
class _Tally:
    """A split's numbers, prompt by prompt."""

    drops: Counter = field(default_factory=Counter)
    extras: dict = field(default_factory=dict)
    gaps: list = field(default_factory=list)
    chosen_tok: list = field(default_factory=list)
    rejected_tok: list = field(default_factory=list)
    s_chosen: list = field(default_factory=list)
    s_rejected: list = field(default_factory=list)
    all_tok: list = field(default_factory=list)
    prompts: int = 0
    answers: int = 0
    empty: int = 0
    finished: int = 0
    with_pair: int = 0
    unscored: int = 0
    cut: int = 0

    def add_prompt(self, cands: list, extras: list, cuts: list) -> None:
        self.prompts, self.answers = self.prompts + 1, self.answers + len(cands)
        self.empty += sum(not c.text.strip() for c in cands)
        self.unscored += sum(c.score is None for c in cands)
        self.cut += sum(bool(x) for x in cuts)
        self.finished += sum(c.finished for c in cands)
        self.all_tok += [c.tokens for c in cands]
        for e in extras:
            for k, v in e.items():
                self.extras.setdefault(k, []).append(float(v))

    def add_pair(self, c, r) -> None:
        self.gaps.append(c.score - r.score)
        self.chosen_tok.append(c.tokens)
        self.rejected_tok.append(r.tokens)
        self.s_chosen.append(c.score)
        self.s_rejected.append(r.score)

    def stats(self, pairs: int) -> dict:
        return {
            "prompts": self.prompts, "answers": self.answers, "empty_answers": self.empty,
            "unscored_answers": self.unscored, "reward_input_cut": self.cut,
            "finished_share": round(self.finished / self.answers, 4) if self.answers else None,
            "pairs": pairs, "prompts_with_pair": self.with_pair,
            "dropped": {k: self.drops[k] for k in DROP_REASONS if self.drops[k]},
            "score_gap": describe(self.gaps), "score_chosen_mean": mean4(self.s_chosen),
            "score_rejected_mean": mean4(self.s_rejected), "answer_tokens_mean": mean4(self.all_tok),
            "chosen_tokens_mean": mean4(self.chosen_tok), "rejected_tokens_mean": mean4(self.rejected_tok),
            "reward_extras_mean": {k: mean4(v) for k, v in sorted(self.extras.items())},
        }


def split_rows(batches: list[Batch], answers: dict, scores: dict, opts: BuildOptions) -> tuple[list[dict], dict]:
    """The rows of one split, and its statistics."""
    rows, tally = [], _Tally()
    for b in batches:
        a_rec, s_rec = answers[b.id], scores[b.id]
        for p, per, sc, ex, cuts in zip(b.rows, a_rec["answers"], s_rec["scores"],
                                        s_rec.get("extras") or itertools.repeat([]),
                                        s_rec.get("cut") or itertools.repeat([])):
            cands = candidates(per, sc)
            tally.add_prompt(cands, ex, cuts)
            pairs, why = binarise(cands, opts.strategy, min_gap=opts.min_gap, chosen_must_finish=opts.chosen_must_finish,
                                  rng=random.Random(f"{opts.seed}:{row_key(p)}"))
            tally.drops.update(why)
            tally.with_pair += bool(pairs)
            for c, r in pairs:
                rows.append(pair_row(p, c, r, cands, score_decimals=opts.score_decimals, keep_all=opts.keep_all))
                tally.add_pair(c, r)
    return rows, tally.stats(len(rows))


def _record(ctx: BuildContext, stats: dict, answers: dict, scores: dict) -> dict:
    opts = ctx.opts
    return {
        "format": WORK_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": opts.dataset, "split": opts.split, "sources": ctx.meta["sources"],
        "prompt_field": opts.prompt_field, "max_prompts": opts.max_prompts,
        "duplicate_prompts_dropped": ctx.meta["duplicates"],
        "model": ctx.model, "adapter": opts.adapter, "preset": opts.preset, "chat_template": ctx.template,
        "backend": ctx.backend, "dtype": opts.dtype, "decoding": ctx.decoding.identity(),
        "num_samples": opts.num_samples, "batch_size": ctx.identity["answers"]["batch_size"],
        "reward": {"spec": opts.reward, **ctx.identity["reward"]},
        "strategy": opts.strategy, "min_gap": opts.min_gap, "chosen_must_finish": opts.chosen_must_finish,
        "shards": ctx.store.world, "batches": len(ctx.batches), "splits": stats,
        "throughput": throughput(answers, scores, opts.num_samples),
        "wall_seconds_last_process": round(time.perf_counter() - ctx.started, 2),
        "versions": versions(),
    }


def _write_dataset(out: Path, rows_by_split: dict[str, list[dict]], record: dict) -> None:
    for split in ("train", "test"):
        path, rows = out / f"{split}.jsonl", rows_by_split.get(split)
        if rows:
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        elif path.exists():  # an earlier build's split: not this build's
            path.unlink()
    atomic_write_json(out / "build.json", record)


def merge(ctx: BuildContext, generated: int, scored: int) -> BuildSummary:
    """Write the dataset when every batch (of every shard) has answers and scores."""
    answers = ctx.store.read("answers", ctx.batches)
    scores = ctx.store.read("scores", ctx.batches, answers)
    missing = [b for b in ctx.batches if b.id not in answers or b.id not in scores]
    summary = BuildSummary(ctx.out, ctx.store.root, False, ctx.store.rank, ctx.store.world, len(ctx.batches),
                           len(missing), generated, scored)
    if missing:
        if ctx.opts.merge_only:
            raise ConfigError(f"cannot merge {ctx.store.root}: {len(missing)} of {len(ctx.batches)} batches are not "
                              f"finished (the first: {missing[0].id}); run the build (all its shards) again first")
        return summary
    rows_by_split, stats = {}, {}
    for split in dict.fromkeys(b.split for b in ctx.batches):
        rows_by_split[split], stats[split] = split_rows([b for b in ctx.batches if b.split == split],
                                                        answers, scores, ctx.opts)
    record = _record(ctx, stats, answers, scores)
    _write_dataset(ctx.out, rows_by_split, record)
    summary.complete, summary.record = True, record
    return summary
