"""Tokenised splits and their cache: `tokenize_split` loads, validates and tokenises one split,
reusing a sealed directory under cache_home()/tokenized/<key> (`artefacts.SealedDirCache`: written
whole or not at all, checksummed on every use) whose key (`fingerprint.split_fingerprint`) covers
everything the ids depend on; `load_splits` gives the training and held-out splits of a config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artefacts import SealedDirCache
from ..config import DataConfig
from ..io import atomic_write_json, cache_home
from .errors import DataError, MissingSplitError
from .fingerprint import rows_fingerprint, split_fingerprint
from .pairs import Pair, validate_rows
from .reading import RawRows, load_rows
from .tokenization import PairTokenizer, TokenizeSettings

COLUMNS = ("row", "prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected")


@dataclass
class DataStats:
    rows: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_too_long: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    max_sequence: int = 0
    cache_hit: bool = False

    def summary(self) -> str:
        parts = [f"{self.rows} pairs"]
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} prompts truncated (kept the end)")
        if self.response_truncated:
            parts.append(f"{self.response_truncated} with responses cut to max_length")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped: prompt longer than max_prompt_length")
        return ", ".join(parts)


@dataclass
class TokenizedSplit:
    """A tokenised split, its content fingerprint (the cache key), and what tokenising did."""

    dataset: Any  # datasets.Dataset with prompt_ids/chosen_ids/rejected_ids/row/prompt/chosen/rejected
    fingerprint: str
    stats: DataStats
    source: str

    def __len__(self) -> int:
        return len(self.dataset)


def _add(columns: dict[str, list], stats: DataStats, i: int, pair: Pair, out: dict) -> None:
    """Row i's ids into the columns and its counts into the stats."""
    stats.prompt_truncated += out["prompt_truncated"]
    stats.response_truncated += out["response_truncated"]
    stats.prompt_tokens += len(out["prompt_ids"])
    stats.response_tokens += len(out["chosen_ids"]) + len(out["rejected_ids"])
    stats.max_sequence = max(stats.max_sequence, len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"])))
    columns["row"].append(i)
    columns["prompt_ids"].append(out["prompt_ids"])
    columns["chosen_ids"].append(out["chosen_ids"])
    columns["rejected_ids"].append(out["rejected_ids"])
    columns["prompt"].append(pair.prompt[-1]["content"])
    columns["chosen"].append(pair.chosen[-1]["content"])
    columns["rejected"].append(pair.rejected[-1]["content"])


def _encode(pairs: list[Pair], raw: RawRows, tokenizer, settings: TokenizeSettings, progress=None):
    """(datasets.Dataset, DataStats) of the pairs' ids; prompts too long for `truncation: error`
    are refused together, naming the first rows."""
    import datasets

    encode = PairTokenizer(tokenizer, settings)
    stats = DataStats()
    columns: dict[str, list] = {k: [] for k in COLUMNS}
    too_long = []
    for i, pair in enumerate(pairs):
        out = encode(pair, raw.where(i))
        if out.get("_too_long"):
            too_long.append((i, out["prompt_len"]))
            continue
        _add(columns, stats, i, pair, out)
        if progress is not None:
            progress(i + 1, len(pairs))
    if too_long and settings.truncation == "error":
        first = ", ".join(f"{raw.where(i)} ({n} tokens)" for i, n in too_long[:5])
        raise DataError(
            f"{len(too_long)} prompt(s) longer than max_prompt_length={settings.max_prompt_length} "
            f"with no room for a response within max_length={settings.max_length}: {first}. "
            "Raise data.max_length / data.max_prompt_length, or set data.truncation=keep_end or drop."
        )
    stats.dropped_too_long = len(too_long)
    stats.rows = len(columns["row"])
    if stats.rows == 0:
        raise DataError(f"{raw.source}: no pairs left after tokenisation ({stats.summary()})")
    columns["index"] = list(range(stats.rows))
    return datasets.Dataset.from_dict(columns), stats


def _read_entry(path: Path):
    """A cache entry's (dataset, stats), or None when it has no stats (not an entry)."""
    import datasets

    if not (path / "stats.json").is_file():
        return None
    stats = DataStats(**{**json.loads((path / "stats.json").read_text()), "cache_hit": True})
    return datasets.load_from_disk(str(path / "data")), stats


def _write_entry(value, tmp: Path) -> None:
    ds, stats = value
    ds.save_to_disk(str(tmp / "data"))
    atomic_write_json(tmp / "stats.json", dataclasses.asdict(stats))


def tokenize_split(
    dataset: str, split: str, tokenizer, settings: TokenizeSettings, max_samples: int | None = None,
    use_cache: bool = True, progress=None,
) -> TokenizedSplit:
    """Load, validate and tokenise one split, reusing the on-disk cache when nothing changed."""
    import datasets

    raw = load_rows(dataset, split)
    if max_samples is not None:
        raw = raw.head(max_samples)
    pairs = validate_rows(raw)
    fp = split_fingerprint(rows_fingerprint(pairs), tokenizer, settings)
    build = lambda: _encode(pairs, raw, tokenizer, settings, progress)  # noqa: E731
    if not use_cache:
        ds, stats = build()
        return TokenizedSplit(ds, fp, stats, raw.source)
    cache = SealedDirCache(cache_home() / "tokenized")
    (ds, stats), hit = cache.get_or_build(fp, build, read=_read_entry, write=_write_entry)
    if not hit:  # the saved copy, memory-mapped, as a hit would read it
        ds = datasets.load_from_disk(str(cache.path(fp) / "data"))
    return TokenizedSplit(ds, fp, stats, raw.source)


def load_splits(cfg: DataConfig, tokenizer, *, use_cache: bool = True) -> tuple[TokenizedSplit, TokenizedSplit | None]:
    """The training split and (if configured and present) the held-out split."""
    settings = TokenizeSettings(cfg.max_length, cfg.max_prompt_length, cfg.truncation, cfg.pipeline)
    train = tokenize_split(cfg.dataset, cfg.train_split, tokenizer, settings, cfg.max_samples, use_cache)
    evaluation = None
    if cfg.eval_split:
        source = cfg.eval_dataset or cfg.dataset
        if Path(source).is_file() and not cfg.eval_dataset:
            return train, None  # a single training file has no held-out split
        try:
            evaluation = tokenize_split(source, cfg.eval_split, tokenizer, settings, cfg.max_eval_samples, use_cache)
        except MissingSplitError:
            if cfg.eval_dataset:  # asked for by name: its absence is an error
                raise
    return train, evaluation
