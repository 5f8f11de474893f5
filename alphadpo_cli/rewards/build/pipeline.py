"""The build from end to end: everything checked before a model loads, then the phases of this
process's batches, then the merge (by whichever process finds every batch done)."""

from __future__ import annotations

import os
from pathlib import Path

from ...config import ConfigError
from ...prompts import PromptRow
from .. import Reward
from ..identity import check_reward_early
from .merge import merge
from .options import (DEFAULT_BATCH, WORK_FORMAT, BuildOptions, BuildSummary, check_options, resolve_decoding,
                      reward_identity_of)
from .pairing import Candidate, candidates
from .phases import BuildContext, progress_bars, run_generation, run_scoring
from .prompts import load_prompt_splits, make_batches
from .work import WorkStore, gpu_for_shard, shard_from_env

_OURS = {"train.jsonl", "test.jsonl", "build.json", ".work"}


def _check_output_dir(out: Path, work: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory")
    if not out.is_dir() or overwrite:
        return
    names = {p.name for p in out.iterdir()}
    if names and "build.json" not in names and not work.exists() and not names <= _OURS:
        raise ConfigError(f"{out} exists and holds files no data build wrote ({', '.join(sorted(names)[:5])}); "
                          "choose another --output-dir, or pass --overwrite")


def _shard(opts: BuildOptions) -> tuple[int, int]:
    """(rank, world), and under a launcher this process pinned to its GPU."""
    rank, world = opts.shard if opts.shard is not None else shard_from_env()
    if not 0 <= rank < world:
        raise ConfigError(f"shard {rank} of {world}: expected 0 <= shard < number of shards")
    pinned = gpu_for_shard() if opts.shard is None else None
    if pinned is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = pinned
    return rank, world


def _backend(opts: BuildOptions, generator, decoding, model) -> str:
    """A given generator's backend (its decoding must be the options'), else the resolved one."""
    if generator is None:
        from ...evaluation.generate import resolve_backend

        return resolve_backend(opts.backend, model)
    given = getattr(generator, "decoding", None)
    if given is not None and given.identity() != decoding.identity():
        raise ConfigError(f"the given generator decodes with {given.identity()}, the options say {decoding.identity()}")
    return getattr(generator, "backend", "custom")


def _prepare(opts: BuildOptions, generator, reward: Reward | None, console,
             quiet: bool) -> tuple[BuildContext, Reward | None]:
    """Everything checked before a model loads: options, prompts, reward, work directory."""
    check_options(opts)
    rank, world = _shard(opts)
    splits, meta = load_prompt_splits(opts)
    decoding, model, template = resolve_decoding(opts)
    reward = reward if reward is not None else check_reward_early(opts.reward)
    backend = _backend(opts, generator, decoding, model)
    batch_size = opts.batch_size or DEFAULT_BATCH.get(backend, 8)
    out = Path(opts.output_dir).expanduser()
    _check_output_dir(out, opts.work_path, opts.overwrite)
    identity = {"format": WORK_FORMAT,
                "answers": {"model": model, "adapter": opts.adapter, "chat_template": template, "backend": backend,
                            "dtype": opts.dtype, "decoding": decoding.identity(), "num_samples": opts.num_samples,
                            "batch_size": batch_size},
                "reward": reward_identity_of(opts, reward)}
    store = WorkStore(opts.work_path, rank, world)
    store.prepare(identity, overwrite=opts.overwrite, rescore=opts.rescore)
    if opts.overwrite:
        for name in ("train.jsonl", "test.jsonl", "build.json"):
            (out / name).unlink(missing_ok=True)
    ctx = BuildContext(opts, store, out, make_batches(splits, batch_size), identity, meta, decoding, model, template,
                       backend, console, quiet)
    return ctx, reward


def build_dataset(opts: BuildOptions, *, generator=None, reward: Reward | None = None, console=None,
                  quiet: bool = False) -> BuildSummary:
    """Sample, score, binarise and write (see the package docstring). `generator` (anything with
    `sample(batch, n, seed_key)` and `backend`, e.g. a `ChatGenerator`) and `reward` may be given
    instead of being loaded from `opts`; given ones are not closed."""
    ctx, reward = _prepare(opts, generator, reward, console, quiet)
    mine = ctx.mine()
    generated = scored = 0
    if not opts.merge_only:
        if ctx.store.world > 1:
            ctx.say(f"shard {ctx.store.rank} of {ctx.store.world}: {len(mine)} of {len(ctx.batches)} batches")
        with progress_bars(console, quiet) as bars:
            generated = run_generation(ctx, mine, generator, bars)
            if not opts.generate_only:
                scored = run_scoring(ctx, mine, reward, bars)
    summary = merge(ctx, generated, scored)
    if not summary.complete:
        left = "other shards' batches (the last shard to finish writes the dataset, or run with --merge)" \
            if ctx.store.world > 1 else "batches (run the same command again to continue)"
        ctx.say(f"{summary.missing} of {summary.batches} batches still to do: {left}; work in {ctx.store.root}")
    return summary


def load_scored(opts: BuildOptions) -> dict[str, list[tuple[PromptRow, list[Candidate]]]]:
    """{split: [(prompt, its scored answers)]} of a build's work directory (for a report of one's own)."""
    splits, _ = load_prompt_splits(opts)
    store = WorkStore.existing(opts.work_path)
    batches = make_batches(splits, store.identity["answers"]["batch_size"])
    answers = store.read("answers", batches)
    scores = store.read("scores", batches, answers)
    out: dict[str, list] = {s: [] for s in splits}
    for b in batches:
        if b.id in answers and b.id in scores:
            for p, per, sc in zip(b.rows, answers[b.id]["answers"], scores[b.id]["scores"]):
                out[b.split].append((p, candidates(per, sc)))
    return out
