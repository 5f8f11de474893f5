"""The tokenised-cache key (`split_fingerprint`): what determines the ids, and nothing else — the
rows' content, the tokenizer's content, every tokenisation setting, the tokenisation code and the
libraries that run it. No version number to bump by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterable

from .pairs import Pair
from .tokenization import TokenizeSettings

#: The code that turns rows into token ids: every step, from reading a file to the ids and the
#: truncation, lives in this package (alphadpo_cli/data/). The bytes of its modules, in name order,
#: are part of the tokenised-cache key (`tokenization_code_sha256`), so any edit of them misses the
#: cache: no version to bump by hand.
TOKENIZATION_SOURCES: tuple[Path, ...] = tuple(sorted(Path(__file__).resolve().parent.glob("*.py")))
_CODE_SHA: dict[tuple[Path, ...], str] = {}


def rows_fingerprint(pairs: Iterable[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The content of what makes the tokenizer's ids: its serialised model (tokenizer.json as the
    backend holds it: vocabulary, merges, normaliser, pre-tokeniser, post-processor, added
    tokens), or the vocabulary files of a tokenizer without one, the chat template, the special
    tokens the template may write and the BOS/EOS flags. Not where it was loaded from, nor how
    (hub id or local snapshot, online or offline: the same files give the same fingerprint)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(_vocab_files_sha256(tokenizer).encode())
    h.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    flags = {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")}
    h.update(json.dumps([type(tokenizer).__name__, specials, flags], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _vocab_files_sha256(tokenizer) -> str:
    """A tokenizer without a `tokenizers` backend (e.g. sentencepiece): its vocabulary files as it
    saves them (`vocab_files_names`), hashed."""
    import tempfile

    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="alphadpo-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(set(getattr(tokenizer, "vocab_files_names", {}).values()))
        for name in names:
            f = Path(tmp) / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes())
    if not names:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def tokenization_code_sha256() -> str:
    """SHA-256 of the bytes of `TOKENIZATION_SOURCES` (this package's modules, one after the
    other), computed once per process. The whole package rather than the source of chosen
    functions: no helper that the tokenisation calls can be left out of the key by mistake, at the
    price of a rebuild (seconds) after an edit that changes no token."""
    key = tuple(TOKENIZATION_SOURCES)
    if key not in _CODE_SHA:
        h = hashlib.sha256()
        for path in key:
            h.update(Path(path).read_bytes())
        _CODE_SHA[key] = h.hexdigest()
    return _CODE_SHA[key]


def _library_versions() -> dict:
    """The libraries whose code turns text into ids (a tokenizer bug fix changes tokens)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tokenizers", "transformers", "jinja2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def split_fingerprint(content_fp: str, tokenizer, settings: TokenizeSettings) -> str:
    """The tokenised-cache key: the rows, the tokenizer's content, every tokenisation setting,
    the tokenisation code and the libraries that run it."""
    key = json.dumps(
        [tokenization_code_sha256(), _library_versions(), content_fp, tokenizer_fingerprint(tokenizer),
         dataclasses.asdict(settings)],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]
