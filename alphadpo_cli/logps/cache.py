"""Reference log-probabilities on disk: computed once, then read back (`ReferenceCache.get_or_compute`).

The cache key covers the reference weights (`models.loading.model_fingerprint`: a hub snapshot's
commit or the weight files' content, the same online and offline), the tokenised data (whose
fingerprint covers the rows, the tokenizer's content, every tokenisation setting and the
tokenisation code), the dtype, the code that computes the scores (`scoring_code_sha256`: the
bytes of the logps, kernels and models packages) and the torch and transformers versions, so any
change misses the cache; there is no version number to bump by hand. Sums and
token counts are both stored, so averaged and summed methods read the same file. A file whose
checksum does not match is rebuilt, never trusted. Entries are `artefacts.SealedDirCache`
directories, written atomically (a killed write leaves the previous state).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..artefacts import SealedDirCache
from ..data import TokenizedSplit
from ..io import cache_home
from ..losses.types import PreferenceLogps

# The packages whose code computes a reference score: the forward passes and their layouts
# (logps), the attention and norm kernels patched into the model (kernels), and how the model is
# loaded and its adapters disabled (models). This file is among them: a change of the cache's own
# layout misses the old entries too.
SCORING_PACKAGES = ("logps", "kernels", "models")
_CODE_SHA: dict[tuple[str, ...], str] = {}


def scoring_code_sha256() -> str:
    """SHA-256 of the source files of `SCORING_PACKAGES`, computed once per process."""
    key = tuple(SCORING_PACKAGES)
    if key not in _CODE_SHA:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for pkg in key:
            for f in sorted((root / pkg).rglob("*.py")):
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        _CODE_SHA[key] = h.hexdigest()
    return _CODE_SHA[key]


def _versions() -> list:
    import transformers

    return [torch.__version__, transformers.__version__]


# file tensor name -> PreferenceLogps field (one network's scores: see PreferenceLogps.with_reference)
_FIELDS = {"chosen_sum": "policy_chosen_logps", "rejected_sum": "policy_rejected_logps",
           "chosen_count": "chosen_lengths", "rejected_count": "rejected_lengths"}


def cache_key(model_fingerprint: str, split: TokenizedSplit, dtype: torch.dtype) -> str:
    """The cache entry of `split`'s reference scores (see the module docstring for what it covers)."""
    raw = json.dumps([scoring_code_sha256(), _versions(), model_fingerprint, split.fingerprint,
                      len(split), str(dtype)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _read(path: Path, key: str, rows: int) -> PreferenceLogps | None:
    """A sealed entry's scores, or None when it is of another key or of another row count."""
    from safetensors.torch import load_file

    if not (path / "meta.json").is_file():
        return None
    tensors = load_file(str(path / "logps.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("key") != key or int(tensors["chosen_sum"].shape[0]) != rows:
        return None
    return PreferenceLogps(**{field: tensors[name] for name, field in _FIELDS.items()})


def _write(scores: PreferenceLogps, tmp: Path, key: str, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({name: getattr(scores, field).contiguous() for name, field in _FIELDS.items()},
              str(tmp / "logps.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "key": key}, indent=2, default=str))


class ReferenceCache:
    """Per-pair reference scores by cache key, under `root` (default: the package cache's
    reference/): an `artefacts.SealedDirCache` whose entries hold logps.safetensors and meta.json."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_home() / "reference"
        self._dirs = SealedDirCache(self.root)

    def path(self, key: str) -> Path:
        return self._dirs.path(key)

    def load(self, key: str, rows: int) -> PreferenceLogps | None:
        """The stored scores, or None when absent, corrupt, of another key or of another row count."""
        return self._dirs.load(key, lambda path: _read(path, key, rows))

    def save(self, key: str, scores: PreferenceLogps, meta: dict) -> None:
        self._dirs.save(key, lambda tmp: _write(scores, tmp, key, meta))

    def get_or_compute(self, key: str, rows: int, compute: Callable[[], PreferenceLogps], *, meta: dict,
                       agree: Callable[[bool], bool] | None = None, save: bool = True) -> tuple[PreferenceLogps, bool]:
        """(scores, cache hit). `agree(hit)` makes several processes take the same branch (a hit only
        where every process has one); `save=False` on all but the process that writes."""
        return self._dirs.get_or_build(key, compute, read=lambda path: _read(path, key, rows),
                                       write=lambda scores, tmp: _write(scores, tmp, key, meta),
                                       agree=agree, save=save)
