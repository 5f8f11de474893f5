"""Preference data: reading, validation, chat templating, tokenisation and its cache.

Rows are validated before anything is tokenised, and every problem names the file, the row and
the field. The parts, in the order a split goes through them:

* `reading`: `load_rows` (JSON Lines, JSON, Parquet, folders, `pkg:` data, the hub) to `RawRows`;
* `pairs`: `validate_rows` / `to_pair`, every layout to a `Pair` of messages;
* `tokenization`: `PairTokenizer`, running the pipeline `data.pipeline` names (`PIPELINES`: this
  project's `tokenize_default`, or the authors' `authors.tokenize_authors`), and the one BOS rule
  `uses_document_bos` that generation shares;
* `fingerprint` and `cache`: the tokenised-cache key and `tokenize_split` / `load_splits`;
* `errors`: `DataError` and `MissingSplitError`.
"""

from .authors import authors_texts, tokenize_authors
from .cache import DataStats, TokenizedSplit, load_splits, tokenize_split
from .errors import DataError, MissingSplitError
from .fingerprint import TOKENIZATION_SOURCES, rows_fingerprint, tokenization_code_sha256, tokenizer_fingerprint
from .pairs import MAX_REPORTED_ERRORS, REQUIRED, Pair, check_messages, to_pair, validate_rows
from .reading import READERS, RawRows, load_rows, read_json, read_jsonl, read_parquet
from .tokenization import PIPELINES, PairTokenizer, TokenizeSettings, render, tokenize_default, uses_document_bos

__all__ = [
    "MAX_REPORTED_ERRORS", "PIPELINES", "READERS", "REQUIRED", "TOKENIZATION_SOURCES",
    "DataError", "DataStats", "MissingSplitError", "Pair", "PairTokenizer", "RawRows", "TokenizeSettings",
    "TokenizedSplit", "authors_texts", "check_messages", "load_rows", "load_splits", "read_json", "read_jsonl",
    "read_parquet", "render", "rows_fingerprint", "to_pair", "tokenization_code_sha256", "tokenize_authors",
    "tokenize_default", "tokenize_split", "tokenizer_fingerprint", "uses_document_bos", "validate_rows",
]
