"""The two phases that do the work, batch by batch: sample each batch's answers (then free the
generator), score them with the reward. Each finished batch is one record in this process's
work log, so a rerun starts where a kill stopped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...console import Bars

from .. import Reward, RewardItem, checked_scores
from .options import BuildOptions, load_reward_of
from .prompts import Batch
from .work import WorkStore, answers_hash


@dataclass
class BuildContext:
    """One build, prepared: its options, work store, batches and resolved settings."""

    opts: BuildOptions
    store: WorkStore
    out: Path
    batches: list[Batch]
    identity: dict
    meta: dict
    decoding: Any
    model: str | None
    template: str | None
    backend: str
    console: Any = None
    quiet: bool = False
    started: float = field(default_factory=time.perf_counter)

    def say(self, msg: str) -> None:
        if self.console is not None and not self.quiet:
            self.console.print(msg, highlight=False)

    def mine(self) -> list[Batch]:
        """This process's batches: every world-th from its rank."""
        return [b for b in self.batches if b.order % self.store.world == self.store.rank]


def progress_bars(console, quiet: bool) -> Bars:
    """The build's bars: prompts done of all, elapsed, remaining and the throughput (nothing when quiet)."""
    return Bars(console, disable=quiet, unit="prompts", fields="{task.fields[rate]}")


def _generate_phase(todo: list[Batch], gen, store: WorkStore, n: int, bars: Bars) -> None:
    if hasattr(gen, "load"):
        gen.load()  # loading is not generation time
    advance = bars.bar("sampling", sum(len(b.rows) for b in todo), rate="")
    seconds = prompts = answers = tokens = 0
    with store.log("answers") as log:
        for b in todo:
            start = time.perf_counter()
            sampled = gen.sample([r.messages for r in b.rows], n, seed_key=b.id)
            took = time.perf_counter() - start
            if len(sampled) != len(b.rows) or any(len(s) != n for s in sampled):
                raise RuntimeError(f"the generator returned {[len(s) for s in sampled]} answers for "
                                   f"{len(b.rows)} prompts x {n}")
            batch_tokens = sum(a.tokens for s in sampled for a in s)
            log.append({"id": b.id, "hash": b.hash, "seconds": round(took, 3), "tokens": batch_tokens,
                        "answers": [[[a.text, a.tokens, a.finish] for a in s] for s in sampled]})
            seconds, prompts, tokens = seconds + took, prompts + len(b.rows), tokens + batch_tokens
            answers += len(b.rows) * n
            advance(len(b.rows), rate=f"{prompts / seconds:.2f} prompts/s · {answers / seconds:.1f} answers/s · "
                                 f"{tokens / seconds:.0f} tok/s")


def _score_record(b: Batch, rec: dict, scored: list, took: float) -> dict:
    k = len(rec["answers"][0])
    rows = lambda f: [[f(s) for s in scored[i:i + k]] for i in range(0, len(scored), k)]  # noqa: E731
    entry = {"id": b.id, "hash": b.hash, "answers_hash": answers_hash(rec), "seconds": round(took, 3),
             "scores": rows(lambda s: s.score if s.ok else None), "extras": rows(lambda s: s.extras)}
    if any(s.cut for s in scored):
        entry["cut"] = rows(lambda s: s.cut)
    if not all(s.ok for s in scored):
        entry["failed"] = rows(lambda s: s.failed)
    return entry


def _score_phase(todo: list[Batch], answers: dict[str, dict], reward: Reward, store: WorkStore, bars: Bars) -> None:
    advance = bars.bar("scoring", sum(len(b.rows) for b in todo), rate="")
    seconds = count = 0
    with store.log("scores") as log:
        for b in todo:
            rec = answers[b.id]
            items = [RewardItem(row.messages, text, row.extras, finish == "stop", f"{row.where}, answer {j + 1}")
                     for row, per in zip(b.rows, rec["answers"]) for j, (text, _tokens, finish) in enumerate(per)]
            start = time.perf_counter()
            scored = checked_scores(reward, items, reward.score(items))
            took = time.perf_counter() - start
            log.append(_score_record(b, rec, scored, took))
            seconds, count = seconds + took, count + len(items)
            advance(len(b.rows), rate=f"{count / seconds:.1f} answers/s" if seconds >= 0.1 else "")


def _generator(ctx: BuildContext):
    from ...evaluation.generate import ChatGenerator

    opts = ctx.opts
    vllm_args = {"gpu_memory_utilization": opts.gpu_memory_utilization} if opts.gpu_memory_utilization else {}
    return ChatGenerator(ctx.model, opts.adapter, decoding=ctx.decoding, backend=ctx.backend, dtype=opts.dtype,
                         chat_template=ctx.template, vllm_args=vllm_args)


def run_generation(ctx: BuildContext, mine: list[Batch], generator, bars: Bars) -> int:
    """Sample the batches of `mine` not yet sampled (at most `max_batches`); how many."""
    opts = ctx.opts
    done = ctx.store.read("answers", mine)
    todo = [b for b in mine if b.id not in done]
    if opts.max_batches is not None:
        todo = todo[:opts.max_batches]
    if done and todo:
        ctx.say(f"resuming: {len(done)} of {len(mine)} batches already sampled in {ctx.store.root}")
    if not todo:
        return 0
    gen = generator if generator is not None else _generator(ctx)
    try:
        _generate_phase(todo, gen, ctx.store, opts.num_samples, bars)
    finally:
        if generator is None:
            gen.close()  # frees the GPU for the reward model
    return len(todo)


def run_scoring(ctx: BuildContext, mine: list[Batch], reward: Reward | None, bars: Bars) -> int:
    """Score the sampled batches of `mine` not yet scored (at most `max_batches`); how many."""
    opts = ctx.opts
    answers = ctx.store.read("answers", mine)
    done = ctx.store.read("scores", mine, answers)
    todo = [b for b in mine if b.id in answers and b.id not in done]
    if opts.max_batches is not None:
        todo = todo[:opts.max_batches]
    if not todo:
        return 0
    scorer = reward if reward is not None else load_reward_of(opts)
    try:
        _score_phase(todo, answers, scorer, ctx.store, bars)
    finally:
        if reward is None:
            scorer.close()
    return len(todo)
