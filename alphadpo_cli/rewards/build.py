"""On-policy preference data (`alphadpo data build`): sample answers from a model, score them
with a reward, binarise them into chosen/rejected pairs, and write a dataset that
`alphadpo train --dataset` reads as it is.

    from alphadpo_cli.rewards.build import BuildOptions, build_dataset
    summary = build_dataset(BuildOptions(dataset="prompts.jsonl", output_dir="data/onpolicy",
                                         model="tiny-random", reward="examples/verifiable_reward.py:reward"))

The pipeline of the paper's Llama3-Instruct v0.2 setting (SimPO's `on_policy_data_gen`): N answers
per prompt at temperature 0.8, top-p 0.95 (5 by default), the longest allowed by the preset,
scored by a reward (ArmoRM there); the best answer is chosen and the worst rejected.

* Prompts: a hub id, file or directory, read by `alphadpo_cli.prompts.read_prompts` (the reader
  `alphadpo eval reward` uses): a preference row's prompt as training sees it, else its `prompt`,
  else its `messages` conversation without the last answer (or the column named by
  `prompt_field`). Every other field of the row (e.g. a verifiable row's `constraints`) is handed
  to the reward and copied into the output rows. Bad rows are reported (file, row, field) before
  any model loads.
* Generation: `evaluation.generate.ChatGenerator.sample` (vLLM on a GPU, batched transformers
  otherwise), the code `alphadpo eval` uses.
* Work, in batches of prompts, each appended as one fsynced JSONL line to `<work>/answers.*.jsonl`
  and then `<work>/scores.*.jsonl` (`<work>` = `<output>/.work`): a killed build reruns only the
  batches it had not finished. The settings that make the answers and the scores are recorded in
  `<work>/identity.json`; a rerun with other settings is refused (`overwrite` starts again,
  `rescore` keeps the answers and scores them again with a new reward).
* Shards: with RANK/WORLD_SIZE (torchrun, accelerate) or `shard=(k, n)`, a process takes every
  n-th batch and appends to its own files; whichever process finds every batch done writes the
  dataset (or `merge_only`). On a GPU machine each process is pinned to GPU LOCAL_RANK.
* Output: `train.jsonl` (and `test.jsonl` with a test split), UltraFeedback-binarized rows
  (prompt, chosen and rejected message lists, score_chosen, score_rejected, the row's other
  fields), and `build.json`: the settings, counts, dropped pairs by reason, score gaps, lengths,
  throughput, versions.
* Scores: a function reward that returns NaN, an infinity or anything but a number stops the
  build with the function, the row and the prompt named. A reward model's answer that it could
  not score (a NaN or infinite output) takes no part in any pair, and is counted
  (`unscored_answers`); an answer whose reward-model input was longer than the model's max
  length was cut from the left (the end of the answer kept) and is counted (`reward_input_cut`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import ConfigError
from ..data import DataError
from ..integrity import json_sha256
from ..io import atomic_write_json, atomic_write_text
from ..prompts import PromptRow, extract_prompt, read_prompts
from . import Reward, RewardItem, checked_scores, load_reward
from .identity import check_reward_early, reward_identity

__all__ = ["BuildOptions", "BuildSummary", "Candidate", "PromptRow", "STRATEGIES", "DROP_REASONS", "binarise",
           "build_dataset", "extract_prompt", "load_prompt_splits", "load_scored", "print_summary", "shard_from_env"]

# SimPO's on-policy recipe (on_policy_data_gen/decode.py): 5 samples at T 0.8, top-p 0.95
NUM_SAMPLES, TEMPERATURE, TOP_P = 5, 0.8, 0.95
STRATEGIES = ("best-worst", "all-pairs", "best-random")
DROP_REASONS = {
    "too_few_answers": "fewer than two non-empty, scored answers",
    "no_finished_answer": "no answer ended on its own (a chosen answer must)",
    "identical": "chosen and rejected texts identical",
    "tie": "equal scores",
    "small_gap": "score gap not above --min-gap",
    "unfinished_chosen": "the better answer was cut off by the token budget",
}
DEFAULT_BATCH = {"transformers": 8, "vllm": 512}  # prompts per batch (the unit of resuming)
WORK_FORMAT = 1

@dataclass
class BuildOptions:
    dataset: str  # the prompts: hub id, file or directory
    output_dir: str
    model: str | None = None  # default: the preset's
    reward: str | None = None  # module:function, file.py:function, or a reward model
    adapter: str | None = None
    preset: str | None = None  # max_new_tokens, stop ids, chat template and model from a preset
    split: str = "train"
    test_split: str | None = None  # a held-out prompt split (of test_dataset, else dataset)
    test_dataset: str | None = None
    test_fraction: float | None = None  # or carve the test prompts out of the train prompts
    test_size: int | None = None
    prompt_field: str | None = None
    max_prompts: int | None = None  # the first N prompts of each prompt split
    num_samples: int = NUM_SAMPLES
    temperature: float | None = None  # None: TEMPERATURE
    top_p: float | None = None  # None: TOP_P
    max_new_tokens: int | None = None  # None: the preset's (1024 without one)
    seed: int = 42
    batch_size: int | None = None  # prompts per batch; None: DEFAULT_BATCH[backend]
    backend: str = "auto"
    dtype: str = "auto"
    chat_template: str | None = None
    strategy: str = "best-worst"
    min_gap: float = 0.0
    chosen_must_finish: bool = True
    keep_all: bool = False  # also write every answer and score (all_generated_responses, all_rm_scores)
    score_decimals: int | None = None
    reward_batch_size: int = 8
    reward_dtype: str = "auto"
    reward_max_length: int = 4096
    trust_remote_code: bool = False
    gpu_memory_utilization: float | None = None  # vLLM
    shard: tuple[int, int] | None = None  # (rank, world); None: from the environment
    work_dir: str | None = None  # default <output_dir>/.work
    max_batches: int | None = None  # stop after this many new batches per phase (a partial run)
    generate_only: bool = False
    merge_only: bool = False
    overwrite: bool = False
    rescore: bool = False


@dataclass
class BuildSummary:
    output_dir: Path
    work_dir: Path
    complete: bool  # the dataset was written
    rank: int
    world: int
    batches: int
    missing: int  # batches without answers or scores (other shards', or not yet run)
    generated: int  # batches sampled by this call
    scored: int
    record: dict | None = None  # build.json, when complete


# ---------------------------------------------------------------------------------------------
# prompts


def _row_key(p: PromptRow) -> str:
    """The prompt and its row data: what a batch's answers and scores depend on."""
    return _hash([p.messages, p.extras])


def _hash(obj: Any) -> str:
    return json_sha256(obj)


def _carve_test(rows: list[PromptRow], opts: BuildOptions) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, test): a prompt is test by a hash of (seed, prompt) for a fraction (stable when more
    prompts are added), or one of a seeded sample of `test_size` prompts."""
    if opts.test_fraction is not None:
        test = {i for i, r in enumerate(rows)
                if int(_hash([opts.seed, r.messages]), 16) / 16 ** 16 < opts.test_fraction}
    else:
        if opts.test_size >= len(rows):
            raise ConfigError(f"--test-size {opts.test_size} leaves no training prompts (there are {len(rows)})")
        test = set(random.Random(opts.seed).sample(range(len(rows)), opts.test_size))
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def _dedupe(rows: list[PromptRow], seen: set[str]) -> tuple[list[PromptRow], int]:
    out = []
    for r in rows:
        k = _hash(r.messages)
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
        sources["test"] = f"{source} (held out: {'fraction %g' % opts.test_fraction if opts.test_fraction is not None else opts.test_size})"
    seen: set[str] = set()
    test, dup_test = _dedupe(test, seen)
    train, dup_train = _dedupe(train, seen)
    splits = {"train": train, **({"test": test} if test else {})}
    if not train:
        raise DataError(f"{source}: no training prompts left")
    return splits, {"sources": sources, "duplicates": {"train": dup_train, "test": dup_test}}


# ---------------------------------------------------------------------------------------------
# binarisation


@dataclass
class Candidate:
    text: str
    score: float | None  # None: the reward model could not score it (it takes no part in a pair)
    finished: bool = True
    tokens: int = 0


def _why_not(chosen: Candidate, rejected: Candidate, min_gap: float) -> str | None:
    if chosen.text.strip() == rejected.text.strip():
        return "identical"
    if chosen.score == rejected.score:
        return "tie"
    if chosen.score < rejected.score:  # only when the better answers were all cut off
        return "unfinished_chosen"
    if chosen.score - rejected.score <= min_gap:
        return "small_gap"
    return None


def binarise(candidates: Sequence[Candidate], strategy: str = "best-worst", *, min_gap: float = 0.0,
             chosen_must_finish: bool = True, rng: random.Random | None = None
             ) -> tuple[list[tuple[Candidate, Candidate]], Counter]:
    """(chosen, rejected) pairs of one prompt's answers, and the pairs not made, by reason.

    Empty answers and answers without a score (a reward model's failure) take no part.
    `best-worst`: the best answer (that ended on its own, with `chosen_must_finish`) against the
    worst other one; `best-random`: against a random other one; `all-pairs`: every two answers,
    the better one chosen. Identical texts, equal scores, gaps
    not above `min_gap`, and (`chosen_must_finish`) a cut-off better answer make no pair. The first
    of equal best (worst) answers is taken.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{strategy}' ({', '.join(STRATEGIES)})")
    drops: Counter = Counter()
    valid = [c for c in candidates if c.text.strip() and c.score is not None]
    if len(valid) < 2:
        drops["too_few_answers"] += 1
        return [], drops
    pairs = []
    if strategy == "all-pairs":
        for a, b in itertools.combinations(valid, 2):
            hi, lo = (a, b) if a.score >= b.score else (b, a)
            reason = _why_not(hi, lo, min_gap)
            if reason is None and chosen_must_finish and not hi.finished:
                reason = "unfinished_chosen"
            if reason is None:
                pairs.append((hi, lo))
            else:
                drops[reason] += 1
        return pairs, drops
    eligible = [i for i, c in enumerate(valid) if c.finished or not chosen_must_finish]
    if not eligible:
        drops["no_finished_answer"] += 1
        return [], drops
    best = max(eligible, key=lambda i: valid[i].score)
    others = [i for i in range(len(valid)) if i != best]
    if strategy == "best-worst":
        other = min(others, key=lambda i: valid[i].score)
    else:
        other = (rng or random.Random(0)).choice(others)
    reason = _why_not(valid[best], valid[other], min_gap)
    if reason is not None:
        drops[reason] += 1
        return [], drops
    return [(valid[best], valid[other])], drops


# ---------------------------------------------------------------------------------------------
# batches and the work directory


@dataclass
class Batch:
    id: str  # "<split>/<n>": also the sampling seed's key
    split: str
    rows: list[PromptRow]
    order: int  # position over all splits: which shard takes it

    @property
    def hash(self) -> str:
        return _hash([_row_key(r) for r in self.rows])


def make_batches(splits: dict[str, list[PromptRow]], batch_size: int) -> list[Batch]:
    out = []
    for split, rows in splits.items():
        for n, start in enumerate(range(0, len(rows), batch_size)):
            out.append(Batch(f"{split}/{n}", split, rows[start:start + batch_size], len(out)))
    return out


def _answers_hash(rec: dict) -> str:
    return _hash(rec["answers"])


def _records(path: Path) -> Iterable[dict]:
    """The records of a work log. A line torn by a kill (the last one then, in the middle after
    a resume appended more) is skipped: its batch is simply done again."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


class WorkStore:
    """The work directory: identity.json, and per process append-only answers/scores logs."""

    def __init__(self, root: Path, rank: int = 0, world: int = 1):
        self.root, self.rank, self.world = Path(root), rank, world

    def log_path(self, kind: str) -> Path:
        return self.root / f"{kind}.{self.rank}-of-{self.world}.jsonl"

    def read(self, kind: str, batches: Iterable[Batch], answers: dict | None = None) -> dict[str, dict]:
        """{batch id: record} of every process's log: records of these prompts only (and, for
        scores, of these answers); the last one wins."""
        wanted = {b.id: b.hash for b in batches}
        out = {}
        for path in sorted(self.root.glob(f"{kind}.*.jsonl")):
            for rec in _records(path):
                bid = rec.get("id")
                if wanted.get(bid) != rec.get("hash"):
                    continue
                if answers is not None and (bid not in answers or _answers_hash(answers[bid]) != rec.get("answers_hash")):
                    continue
                out[bid] = rec
        return out

    def log(self, kind: str):
        from ..evaluation.common import JsonlLog

        return JsonlLog(self.log_path(kind))

    def prepare(self, identity: dict, *, overwrite: bool, rescore: bool) -> None:
        """Refuse a work directory made with other settings, or start it again (overwrite), or
        drop only its scores (rescore, when only the reward changed)."""
        if (overwrite or rescore) and self.world > 1:
            raise ConfigError("--overwrite/--rescore with several shards: run it once in one process first "
                              f"(or delete {self.root}), then launch the shards")
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        path = self.root / "identity.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None and old.get("answers") != identity["answers"]:
            raise ConfigError(f"{self.root} holds answers made with other settings ({_diff(old.get('answers'), identity['answers'])}); "
                              "pass --overwrite to start again, or choose another --output-dir/--work-dir")
        if old is not None and old.get("reward") != identity["reward"]:
            if not rescore:
                raise ConfigError(f"{self.root} was scored with another reward ({_diff(old.get('reward'), identity['reward'])}); "
                                  "pass --rescore to score its answers again with this one, or --overwrite to start again")
            for p in self.root.glob("scores.*.jsonl"):
                p.unlink()
        if old != identity:
            atomic_write_json(path, identity)


def _diff(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [_diff(old.get(k), new.get(k), f"{prefix}{k}.") for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        return "; ".join(parts)
    return f"{prefix.rstrip('.') or 'value'}: {json.dumps(old, default=str)} there, {json.dumps(new, default=str)} now"


def shard_from_env(env: dict | None = None) -> tuple[int, int]:
    """(rank, world) from RANK/WORLD_SIZE (torchrun, accelerate), else LOCAL_RANK/LOCAL_WORLD_SIZE."""
    env = os.environ if env is None else env
    for r, w in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if env.get(w):
            world, rank = int(env[w]), int(env.get(r) or 0)
            if not 0 <= rank < world:
                raise ConfigError(f"{r}={rank} is not below {w}={world}")
            return rank, world
    return 0, 1


def gpu_for_shard(env: dict | None = None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a process launched one per GPU (LOCAL_RANK set, several
    processes): its own GPU only, so that vLLM, transformers and the reward model all use it as
    cuda:0. None when there is nothing to pin (one process, or already pinned)."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1) < 2:
        return None
    local = int(env["LOCAL_RANK"])
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:
        return None  # already one GPU per process
    return visible[local] if visible and local < len(visible) else str(local)


# ---------------------------------------------------------------------------------------------
# settings


def _check_options(opts: BuildOptions) -> None:
    if opts.strategy not in STRATEGIES:
        raise ConfigError(f"unknown --strategy '{opts.strategy}' ({', '.join(STRATEGIES)})")
    if opts.num_samples < 2:
        raise ConfigError(f"--num-samples must be at least 2 to make a pair, not {opts.num_samples}")
    for name in ("max_prompts", "batch_size", "test_size", "reward_batch_size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
    if opts.max_batches is not None and opts.max_batches < 0:
        raise ConfigError(f"--max-batches must be >= 0, not {opts.max_batches}")
    if opts.test_fraction is not None and not 0 < opts.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1, not {opts.test_fraction}")
    held_out = [n for n, v in (("--test-split/--test-dataset", opts.test_split or opts.test_dataset),
                               ("--test-fraction", opts.test_fraction is not None),
                               ("--test-size", opts.test_size is not None)) if v]
    if len(held_out) > 1:
        raise ConfigError(f"choose one way to make the test prompts, not {' and '.join(held_out)}")
    if opts.min_gap < 0:
        raise ConfigError(f"--min-gap must be >= 0, not {opts.min_gap}")
    if opts.generate_only and opts.merge_only:
        raise ConfigError("--generate-only and --merge exclude each other")


def resolve_decoding(opts: BuildOptions):
    """(decoding, model, chat template): the SimPO recipe's sampling, the preset's length."""
    from ..evaluation.generate import decoding_for

    decoding, preset_model, template = decoding_for(
        opts.preset, temperature=TEMPERATURE if opts.temperature is None else opts.temperature,
        top_p=TOP_P if opts.top_p is None else opts.top_p, max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    model = opts.model or preset_model
    if not model and not opts.adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model)")
    return decoding, model, opts.chat_template or template


def _reward_identity(opts: BuildOptions, reward: Reward | None) -> dict:
    spec = opts.reward or getattr(reward, "name", None) or "reward"
    return reward_identity(spec, dtype=opts.reward_dtype, max_length=opts.reward_max_length,
                           trust_remote_code=opts.trust_remote_code)


def _load_reward(opts: BuildOptions) -> Reward:
    return load_reward(opts.reward, dtype=opts.reward_dtype, batch_size=opts.reward_batch_size,
                       max_length=opts.reward_max_length, trust_remote_code=opts.trust_remote_code)


# ---------------------------------------------------------------------------------------------
# the two phases


class _Bars:
    """Rich progress bars with a throughput column (nothing when quiet)."""

    def __init__(self, console, quiet: bool):
        self.console, self.quiet = console, quiet

    def __enter__(self):
        if self.quiet:
            self.progress = None
            return self
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("prompts"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[rate]}"), console=self.console)
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def task(self, description: str, total: int):
        if self.progress is None:
            return lambda n, rate: None
        task = self.progress.add_task(description, total=total, rate="")
        return lambda n, rate: self.progress.update(task, advance=n, rate=rate)


def _generate_phase(todo: list[Batch], gen, store: WorkStore, n: int, bars: _Bars) -> None:
    if hasattr(gen, "load"):
        gen.load()  # loading is not generation time
    advance = bars.task("sampling", sum(len(b.rows) for b in todo))
    seconds = prompts = answers = tokens = 0
    with store.log("answers") as log:
        for b in todo:
            start = time.perf_counter()
            sampled = gen.sample([r.messages for r in b.rows], n, seed_key=b.id)
            took = time.perf_counter() - start
            if len(sampled) != len(b.rows) or any(len(s) != n for s in sampled):
                raise RuntimeError(f"the generator returned {[len(s) for s in sampled]} answers for {len(b.rows)} prompts x {n}")
            batch_tokens = sum(a.tokens for s in sampled for a in s)
            log.append({"id": b.id, "hash": b.hash, "seconds": round(took, 3), "tokens": batch_tokens,
                        "answers": [[[a.text, a.tokens, a.finish] for a in s] for s in sampled]})
            seconds, prompts, answers, tokens = seconds + took, prompts + len(b.rows), answers + len(b.rows) * n, tokens + batch_tokens
            advance(len(b.rows), f"{prompts / seconds:.2f} prompts/s · {answers / seconds:.1f} answers/s · "
                                 f"{tokens / seconds:.0f} tok/s")


def _score_phase(todo: list[Batch], answers: dict[str, dict], reward: Reward, store: WorkStore, bars: _Bars) -> None:
    advance = bars.task("scoring", sum(len(b.rows) for b in todo))
    seconds = count = 0
    with store.log("scores") as log:
        for b in todo:
            rec = answers[b.id]
            items = [RewardItem(row.messages, text, row.extras, finish == "stop", f"{row.where}, answer {j + 1}")
                     for row, per in zip(b.rows, rec["answers"]) for j, (text, _tokens, finish) in enumerate(per)]
            start = time.perf_counter()
            scored = checked_scores(reward, items, reward.score(items))
            took = time.perf_counter() - start
            k = len(rec["answers"][0])
            rows = lambda f: [[f(s) for s in scored[i:i + k]] for i in range(0, len(scored), k)]  # noqa: E731
            entry = {"id": b.id, "hash": b.hash, "answers_hash": _answers_hash(rec), "seconds": round(took, 3),
                     "scores": rows(lambda s: s.score if s.ok else None), "extras": rows(lambda s: s.extras)}
            if any(s.cut for s in scored):
                entry["cut"] = rows(lambda s: s.cut)
            if not all(s.ok for s in scored):
                entry["failed"] = rows(lambda s: s.failed)
            log.append(entry)
            seconds, count = seconds + took, count + len(items)
            advance(len(b.rows), f"{count / seconds:.1f} answers/s" if seconds >= 0.1 else "")


# ---------------------------------------------------------------------------------------------
# the dataset


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(xs: Sequence[float]) -> dict | None:
    """mean, min, p10, p50, p90, max (linear interpolation), or None for no values."""
    if not xs:
        return None
    out = {"mean": statistics.fmean(xs), "min": min(xs)}
    out.update({f"p{int(q * 100)}": _quantile(xs, q) for q in (0.1, 0.5, 0.9)})
    out["max"] = max(xs)
    return {k: round(v, 4) for k, v in out.items()}


def _row(p: PromptRow, c: Candidate, r: Candidate, cands: list[Candidate], opts: BuildOptions) -> dict:
    rnd = (lambda x: round(x, opts.score_decimals)) if opts.score_decimals is not None else float
    single = len(p.messages) == 1 and p.messages[0]["role"] == "user"
    row = {"prompt": p.messages[0]["content"] if single else p.messages,
           "chosen": [*p.messages, {"role": "assistant", "content": c.text}],
           "rejected": [*p.messages, {"role": "assistant", "content": r.text}],
           "score_chosen": rnd(c.score), "score_rejected": rnd(r.score)}
    if opts.keep_all:
        row["all_generated_responses"] = [x.text for x in cands]
        row["all_rm_scores"] = [None if x.score is None else rnd(x.score) for x in cands]
    row.update(p.extras)
    return row


def _candidates(per: list, scores: list[float | None]) -> list[Candidate]:
    return [Candidate(text, None if s is None else float(s), finish == "stop", tokens)
            for (text, tokens, finish), s in zip(per, scores)]


def _split_rows(batches: list[Batch], answers: dict, scores: dict, opts: BuildOptions) -> tuple[list[dict], dict]:
    """The rows of one split, and its statistics."""
    rows, drops, extras = [], Counter(), {}
    gaps, chosen_tok, rejected_tok, s_chosen, s_rejected, all_tok = [], [], [], [], [], []
    prompts = n_answers = empty = finished = with_pair = unscored = cut = 0
    for b in batches:
        a_rec, s_rec = answers[b.id], scores[b.id]
        for p, per, sc, ex, cuts in zip(b.rows, a_rec["answers"], s_rec["scores"],
                                        s_rec.get("extras") or itertools.repeat([]),
                                        s_rec.get("cut") or itertools.repeat([])):
            cands = _candidates(per, sc)
            prompts, n_answers = prompts + 1, n_answers + len(cands)
            empty += sum(not c.text.strip() for c in cands)
            unscored += sum(c.score is None for c in cands)
            cut += sum(bool(x) for x in cuts)
            finished += sum(c.finished for c in cands)
            all_tok += [c.tokens for c in cands]
            for e in ex:
                for k, v in e.items():
                    extras.setdefault(k, []).append(float(v))
            pairs, why = binarise(cands, opts.strategy, min_gap=opts.min_gap, chosen_must_finish=opts.chosen_must_finish,
                                  rng=random.Random(f"{opts.seed}:{_row_key(p)}"))
            drops.update(why)
            with_pair += bool(pairs)
            for c, r in pairs:
                rows.append(_row(p, c, r, cands, opts))
                gaps.append(c.score - r.score)
                chosen_tok.append(c.tokens)
                rejected_tok.append(r.tokens)
                s_chosen.append(c.score)
                s_rejected.append(r.score)
    mean = lambda xs: round(statistics.fmean(xs), 4) if xs else None  # noqa: E731
    return rows, {
        "prompts": prompts, "answers": n_answers, "empty_answers": empty,
        "unscored_answers": unscored, "reward_input_cut": cut,
        "finished_share": round(finished / n_answers, 4) if n_answers else None,
        "pairs": len(rows), "prompts_with_pair": with_pair,
        "dropped": {k: drops[k] for k in DROP_REASONS if drops[k]},
        "score_gap": describe(gaps), "score_chosen_mean": mean(s_chosen), "score_rejected_mean": mean(s_rejected),
        "answer_tokens_mean": mean(all_tok), "chosen_tokens_mean": mean(chosen_tok),
        "rejected_tokens_mean": mean(rejected_tok),
        "reward_extras_mean": {k: mean(v) for k, v in sorted(extras.items())},
    }


def _versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out = {"alphadpo": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _throughput(answers: dict, scores: dict, num_samples: int) -> dict:
    """Summed over every batch of every shard: process-seconds, not wall time."""
    gen_s = sum(r.get("seconds", 0.0) for r in answers.values())
    score_s = sum(r.get("seconds", 0.0) for r in scores.values())
    prompts = sum(len(r["answers"]) for r in answers.values())
    tokens = sum(r.get("tokens", 0) for r in answers.values())
    rate = lambda x, s: round(x / s, 3) if s > 0 else None  # noqa: E731
    return {"generation_seconds": round(gen_s, 2), "scoring_seconds": round(score_s, 2),
            "generated_tokens": tokens, "prompts_per_s": rate(prompts, gen_s),
            "answers_per_s": rate(prompts * num_samples, gen_s), "tokens_per_s": rate(tokens, gen_s),
            "scored_answers_per_s": rate(prompts * num_samples, score_s),
            "seconds_per_1000_prompts": round(1000 * (gen_s + score_s) / prompts, 1) if prompts else None}


def _write_dataset(out: Path, rows_by_split: dict[str, list[dict]], record: dict) -> None:
    for split in ("train", "test"):
        path, rows = out / f"{split}.jsonl", rows_by_split.get(split)
        if rows:
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        elif path.exists():  # an earlier build's split: not this build's
            path.unlink()
    atomic_write_json(out / "build.json", record)


# ---------------------------------------------------------------------------------------------
# the build


@dataclass
class _Ctx:
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


def _run_generation(ctx: _Ctx, mine: list[Batch], generator, bars: _Bars) -> int:
    opts = ctx.opts
    done = ctx.store.read("answers", mine)
    todo = [b for b in mine if b.id not in done]
    if opts.max_batches is not None:
        todo = todo[:opts.max_batches]
    if done and todo:
        ctx.say(f"resuming: {len(done)} of {len(mine)} batches already sampled in {ctx.store.root}")
    if not todo:
        return 0
    gen = generator
    if gen is None:
        from ..evaluation.generate import ChatGenerator

        vllm_args = {"gpu_memory_utilization": opts.gpu_memory_utilization} if opts.gpu_memory_utilization else {}
        gen = ChatGenerator(ctx.model, opts.adapter, decoding=ctx.decoding, backend=ctx.backend, dtype=opts.dtype,
                            chat_template=ctx.template, vllm_args=vllm_args)
    try:
        _generate_phase(todo, gen, ctx.store, opts.num_samples, bars)
    finally:
        if generator is None:
            gen.close()  # frees the GPU for the reward model
    return len(todo)


def _run_scoring(ctx: _Ctx, mine: list[Batch], reward: Reward | None, bars: _Bars) -> int:
    opts = ctx.opts
    answers = ctx.store.read("answers", mine)
    done = ctx.store.read("scores", mine, answers)
    todo = [b for b in mine if b.id in answers and b.id not in done]
    if opts.max_batches is not None:
        todo = todo[:opts.max_batches]
    if not todo:
        return 0
    scorer = reward if reward is not None else _load_reward(opts)
    try:
        _score_phase(todo, answers, scorer, ctx.store, bars)
    finally:
        if reward is None:
            scorer.close()
    return len(todo)


def _record(ctx: _Ctx, stats: dict, answers: dict, scores: dict) -> dict:
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
        "throughput": _throughput(answers, scores, opts.num_samples),
        "wall_seconds_last_process": round(time.perf_counter() - ctx.started, 2),
        "versions": _versions(),
    }


def _merge(ctx: _Ctx, generated: int, scored: int) -> BuildSummary:
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
        rows_by_split[split], stats[split] = _split_rows([b for b in ctx.batches if b.split == split],
                                                         answers, scores, ctx.opts)
    record = _record(ctx, stats, answers, scores)
    _write_dataset(ctx.out, rows_by_split, record)
    summary.complete, summary.record = True, record
    return summary


def _prepare(opts: BuildOptions, generator, reward: Reward | None, console, quiet: bool) -> tuple[_Ctx, Reward | None]:
    """Everything checked before a model loads: options, prompts, reward, work directory."""
    _check_options(opts)
    rank, world = opts.shard if opts.shard is not None else shard_from_env()
    if not 0 <= rank < world:
        raise ConfigError(f"shard {rank} of {world}: expected 0 <= shard < number of shards")
    pinned = gpu_for_shard() if opts.shard is None else None
    if pinned is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = pinned
    splits, meta = load_prompt_splits(opts)
    decoding, model, template = resolve_decoding(opts)
    reward = reward if reward is not None else check_reward_early(opts.reward)
    if generator is not None:
        backend = getattr(generator, "backend", "custom")
        given = getattr(generator, "decoding", None)
        if given is not None and given.identity() != decoding.identity():
            raise ConfigError(f"the given generator decodes with {given.identity()}, the options say {decoding.identity()}")
    else:
        from ..evaluation.generate import resolve_backend

        backend = resolve_backend(opts.backend, model)
    batch_size = opts.batch_size or DEFAULT_BATCH.get(backend, 8)
    out = Path(opts.output_dir).expanduser()
    work = Path(opts.work_dir).expanduser() if opts.work_dir else out / ".work"
    _check_output_dir(out, work, opts.overwrite)
    identity = {"format": WORK_FORMAT,
                "answers": {"model": model, "adapter": opts.adapter, "chat_template": template, "backend": backend,
                            "dtype": opts.dtype, "decoding": decoding.identity(), "num_samples": opts.num_samples,
                            "batch_size": batch_size},
                "reward": _reward_identity(opts, reward)}
    store = WorkStore(work, rank, world)
    store.prepare(identity, overwrite=opts.overwrite, rescore=opts.rescore)
    if opts.overwrite:
        for name in ("train.jsonl", "test.jsonl", "build.json"):
            (out / name).unlink(missing_ok=True)
    ctx = _Ctx(opts, store, out, make_batches(splits, batch_size), identity, meta, decoding, model, template, backend,
               console, quiet)
    return ctx, reward


def build_dataset(opts: BuildOptions, *, generator=None, reward: Reward | None = None, console=None,
                  quiet: bool = False) -> BuildSummary:
    """Sample, score, binarise and write (see the module docstring). `generator` (anything with
    `sample(batch, n, seed_key)` and `backend`, e.g. a `ChatGenerator`) and `reward` may be given
    instead of being loaded from `opts`; given ones are not closed."""
    ctx, reward = _prepare(opts, generator, reward, console, quiet)
    mine = [b for b in ctx.batches if b.order % ctx.store.world == ctx.store.rank]
    generated = scored = 0
    if not opts.merge_only:
        if ctx.store.world > 1:
            ctx.say(f"shard {ctx.store.rank} of {ctx.store.world}: {len(mine)} of {len(ctx.batches)} batches")
        with _Bars(console, quiet) as bars:
            generated = _run_generation(ctx, mine, generator, bars)
            if not opts.generate_only:
                scored = _run_scoring(ctx, mine, reward, bars)
    summary = _merge(ctx, generated, scored)
    if not summary.complete:
        left = "other shards' batches (the last shard to finish writes the dataset, or run with --merge)" \
            if ctx.store.world > 1 else "batches (run the same command again to continue)"
        ctx.say(f"{summary.missing} of {summary.batches} batches still to do: {left}; work in {ctx.store.root}")
    return summary


def load_scored(opts: BuildOptions) -> dict[str, list[tuple[PromptRow, list[Candidate]]]]:
    """{split: [(prompt, its scored answers)]} of a build's work directory (for a report of one's own)."""
    splits, _ = load_prompt_splits(opts)
    work = Path(opts.work_dir) if opts.work_dir else Path(opts.output_dir) / ".work"
    identity = json.loads((work / "identity.json").read_text())
    batches = make_batches(splits, identity["answers"]["batch_size"])
    store = WorkStore(work)
    answers = store.read("answers", batches)
    scores = store.read("scores", batches, answers)
    out: dict[str, list] = {s: [] for s in splits}
    for b in batches:
        if b.id in answers and b.id in scores:
            for p, per, sc in zip(b.rows, answers[b.id]["answers"], scores[b.id]["scores"]):
                out[b.split].append((p, _candidates(per, sc)))
    return out


# ---------------------------------------------------------------------------------------------
# the summary table


def print_summary(summary: BuildSummary, console) -> None:
    from rich.table import Table

    if not summary.complete:
        console.print(f"[yellow]not finished:[/] {summary.missing} of {summary.batches} batches to do "
                      f"(this call: {summary.generated} sampled, {summary.scored} scored)")
        return
    rec = summary.record
    splits = rec["splits"]
    fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    table = Table(title=f"data build: {summary.output_dir} ({rec['strategy']}, {rec['num_samples']} samples per prompt)")
    table.add_column("")
    for split in splits:
        table.add_column(split, justify="right")

    def add(label, get):
        table.add_row(label, *(get(s) for s in splits.values()))

    add("prompts / answers", lambda s: f"{s['prompts']:,} / {s['answers']:,}")
    add("answers ended on their own", lambda s: fmt(s["finished_share"] * 100 if s["finished_share"] is not None else None, ".1f") + " %")
    add("pairs (prompts with a pair)", lambda s: f"{s['pairs']:,} ({s['prompts_with_pair']:,})")
    model_reward = "model" in (rec.get("reward") or {})
    for key, label in (("reward_input_cut", "answers cut to the reward model's max length (start cut)"),
                       ("unscored_answers", "answers the reward model could not score (left out)")):
        if model_reward or any(s.get(key) for s in splits.values()):
            add(label, lambda s, k=key: f"{s.get(k, 0):,}")
    for reason in DROP_REASONS:
        if any(s["dropped"].get(reason) for s in splits.values()):
            add(f"dropped: {reason.replace('_', ' ')}", lambda s, r=reason: f"{s['dropped'].get(r, 0):,}")
    add("score gap mean", lambda s: fmt((s["score_gap"] or {}).get("mean")))
    add("score gap p10 / p50 / p90", lambda s: " / ".join(fmt((s["score_gap"] or {}).get(q)) for q in ("p10", "p50", "p90")))
    add("score chosen / rejected", lambda s: f"{fmt(s['score_chosen_mean'])} / {fmt(s['score_rejected_mean'])}")
    add("tokens chosen / rejected", lambda s: f"{fmt(s['chosen_tokens_mean'], '.1f')} / {fmt(s['rejected_tokens_mean'], '.1f')}")
    for name in sorted({k for s in splits.values() for k in s["reward_extras_mean"]}):
        add(f"reward {name} (all answers)", lambda s, n=name: fmt(s["reward_extras_mean"].get(n)))
    console.print(table)
    t = rec["throughput"]
    scoring = f"{fmt(t['scored_answers_per_s'], '.1f')} answers/s ({t['scoring_seconds']:.1f} s)" \
        if t["scoring_seconds"] >= 0.1 else f"{t['scoring_seconds']:.2f} s"
    console.print(f"generation: {fmt(t['prompts_per_s'])} prompts/s, {fmt(t['answers_per_s'], '.2f')} answers/s, "
                  f"{fmt(t['tokens_per_s'], '.1f')} tokens/s ({t['generation_seconds']:.1f} s, {rec['backend']}); "
                  f"scoring: {scoring}; {fmt(t['seconds_per_1000_prompts'], '.0f')} s per 1,000 prompts "
                  "(summed over batches)", highlight=False)
