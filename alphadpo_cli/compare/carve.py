"""The validation slice: carved from the training prompts, never from the test set.

The distinct prompts of the training split (a prompt with several pairs counts once, so a prompt is
never on both sides) are shuffled with a fixed seed and the first `share` of them, at least one,
become the validation slice; prompts that also appear in the test split are never chosen (they stay
in training, as they were). The pairs are written as they were read to `<out>/data/train.jsonl` (the
rest) and `<out>/data/validation.jsonl`, a folder that `data.dataset` can name: every run then trains
on the rest and reports its held-out accuracy on the validation pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..io import atomic_path
from ..prompts import extract_prompt, prompt_key, read_prompts

VALIDATION_SEED = 0


@dataclass(frozen=True)
class HeldOut:
    """The held-out prompts that report (never choose): the config's held-out split."""

    data: str
    split: str
    max_samples: int | None = None


def held_out_of(cfg) -> HeldOut:
    d = cfg.data
    if not d.eval_split:
        raise ConfigError("alphadpo compare reports on the held-out split: data.eval_split must name one "
                          "(e.g. --set data.eval_split=test)")
    return HeldOut(d.eval_dataset or d.dataset, d.eval_split, d.max_eval_samples)


def held_out_keys(test: HeldOut) -> set[str]:
    return {p.key for p in read_prompts(test.data, test.split, max_prompts=test.max_samples)[0]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def carve_validation(cfg, out_dir: Path, share: float, test: HeldOut) -> dict:
    """Write the two files; returns what was carved (counts, and the files)."""
    from ..data import load_rows

    raw = load_rows(cfg.data.dataset, cfg.data.train_split)
    keys = [prompt_key(extract_prompt(row, raw.where(i))[0]) for i, row in enumerate(raw.rows)]
    distinct = list(dict.fromkeys(keys))
    held = held_out_keys(test)
    candidates = [k for k in distinct if k not in held]
    n = max(1, round(share * len(distinct)))
    if len(candidates) < n or len(distinct) - n < 1:
        raise ConfigError(f"{raw.source}: {len(distinct)} training prompt(s), {len(distinct) - len(candidates)} of "
                          f"them in the test split: too few to carve a validation share of {share} and train on the rest")
    chosen = set(random.Random(VALIDATION_SEED).sample(candidates, n))
    out = Path(out_dir)
    train_rows = [r for r, k in zip(raw.rows, keys) if k not in chosen]
    val_rows = [r for r, k in zip(raw.rows, keys) if k in chosen]
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "validation.jsonl", val_rows)
    return {"dir": str(out), "source": raw.source, "train_pairs": len(train_rows), "validation_pairs": len(val_rows),
            "validation_prompts": n, "training_prompts": len(distinct) - n, "share": share, "seed": VALIDATION_SEED,
            "kept_in_training_as_in_test": len(distinct) - len(candidates)}


def data_overrides(carved_dir: Path) -> list[str]:
    """The --set items that make a run train on the rest and evaluate on the validation pairs."""
    d = Path(carved_dir).resolve()
    return [f"data.dataset={d}", "data.train_split=train", f"data.eval_dataset={d}", "data.eval_split=validation",
            "data.max_eval_samples=null"]
