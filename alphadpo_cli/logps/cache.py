"""Reference log-probabilities on disk: computed once, then read back (`ReferenceCache.get_or_compute`).

The cache key covers the reference weights, the tokenised data (whose fingerprint includes the
tokenizer and every tokenisation setting) and the dtype, so any change misses the cache. Sums and
token counts are both stored, so averaged and summed methods read the same file. A file whose
checksum does not match is rebuilt, never trusted. Entries are written atomically (a killed
write leaves the previous state).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..data import TokenizedSplit
from ..integrity import seal_dir, verify_dir
from ..io import atomic_dir, cache_home
from ..losses.types import PreferenceLogps

CACHE_VERSION = "1"
# file tensor name -> PreferenceLogps field (one network's scores: see PreferenceLogps.with_reference)
_FIELDS = {"chosen_sum": "policy_chosen_logps", "rejected_sum": "policy_rejected_logps",
           "chosen_count": "chosen_lengths", "rejected_count": "rejected_lengths"}


def cache_key(model_fingerprint: str, split: TokenizedSplit, dtype: torch.dtype) -> str:
    raw = json.dumps([CACHE_VERSION, model_fingerprint, split.fingerprint, len(split), str(dtype)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class ReferenceCache:
    """Per-pair reference scores by cache key, under `root` (default: the package cache's reference/)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_home() / "reference"

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, rows: int) -> PreferenceLogps | None:
        """The stored scores, or None when absent, corrupt, of another key or of another row count."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not (path / "meta.json").is_file() or not verify_dir(path):
            return None
        tensors = load_file(str(path / "logps.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key or int(tensors["chosen_sum"].shape[0]) != rows:
            return None
        return PreferenceLogps(**{field: tensors[name] for name, field in _FIELDS.items()})

    def save(self, key: str, scores: PreferenceLogps, meta: dict) -> None:
        from safetensors.torch import save_file

        with atomic_dir(self.path(key)) as tmp:
            save_file({name: getattr(scores, field).contiguous() for name, field in _FIELDS.items()},
                      str(tmp / "logps.safetensors"))
            (tmp / "meta.json").write_text(json.dumps({**meta, "key": key}, indent=2, default=str))
            seal_dir(tmp)

    def get_or_compute(self, key: str, rows: int, compute: Callable[[], PreferenceLogps], *, meta: dict,
                       agree: Callable[[bool], bool] | None = None, save: bool = True) -> tuple[PreferenceLogps, bool]:
        """(scores, cache hit). `agree(hit)` makes several processes take the same branch (a hit only
        where every process has one); `save=False` on all but the process that writes."""
        cached = self.load(key, rows)
        hit = cached is not None if agree is None else agree(cached is not None)
        if hit:
            return cached, True
        scores = compute()
        if save:
            self.save(key, scores, meta)
        return scores, False
