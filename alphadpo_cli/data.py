"""Preference data: loading, validation, chat templating, tokenisation and its cache.

Rows are validated before anything is tokenised, and every problem names the file, the row and
the field. Templating follows the authors' pipeline: the prompt is rendered on its own and each
response is what the template adds after it (so the assistant header and EOS are response
tokens), with exactly one BOS on the prompt and EOS appended to a response that lacks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import ConfigError, DataConfig
from .io import atomic_dir, atomic_write_json, cache_home
from .values import did_you_mean

MAX_REPORTED_ERRORS = 8
#: The code that turns rows into token ids: every step, from reading a file to the ids and the
#: truncation, lives in this module. Its bytes are part of the tokenised-cache key
#: (`tokenization_code_sha256`), so any edit of it misses the cache: no version to bump by hand.
TOKENIZATION_SOURCES: tuple[Path, ...] = (Path(__file__).resolve(),)


class DataError(ValueError):
    """A problem with the user's data, with where it is."""


class MissingSplitError(DataError):
    """The dataset has no such split (its message names the splits it has). Callers that may
    fall back, such as an optional held-out split, catch this type, never the message."""


@dataclass
class RawRows:
    rows: list[dict]
    source: str  # file path or hub id/split, for messages
    line_numbers: list[int] | None = None  # JSONL: the file line of each row
    # A split made of several files: each row's (file, row number in that file).
    origins: list[tuple[str, int]] | None = None

    def where(self, i: int) -> str:
        if self.origins is not None:
            file, n = self.origins[i]
            line = f" (line {self.line_numbers[i]})" if self.line_numbers is not None and self.line_numbers[i] else ""
            return f"{file}, row {n}{line}"
        if self.line_numbers is not None:
            return f"{self.source}, row {i + 1} (line {self.line_numbers[i]})"
        return f"{self.source}, row {i + 1}"

    def head(self, n: int) -> "RawRows":
        """The first n rows, keeping where each came from."""
        cut = lambda xs: None if xs is None else xs[:n]  # noqa: E731
        return RawRows(self.rows[:n], self.source, cut(self.line_numbers), cut(self.origins))


# ---------------------------------------------------------------------------------------------
# reading


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}). "
            "Re-encode the file as UTF-8."
        ) from None


def read_jsonl(path: Path) -> RawRows:
    text = _decode(path, path.read_bytes())
    rows, lines = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {n} is not valid JSON ({exc.msg} at column {exc.colno}). "
                "The file may be truncated or corrupted; fix or remove that line."
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n} is a {type(obj).__name__}, expected a JSON object")
        rows.append(obj)
        lines.append(n)
    if not rows:
        raise DataError(f"{path}: the file is empty (no rows)")
    return RawRows(rows, str(path), lines)


def read_json(path: Path) -> RawRows:
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no rows)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file that is really JSON Lines.
        if exc.msg == "Extra data":
            return read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding exactly one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of rows, got {type(obj).__name__}")
    if not obj:
        raise DataError(f"{path}: the file is empty (no rows)")
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i + 1}: is a {type(row).__name__}, expected an object")
    return RawRows(obj, str(path))


def read_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: cannot read Parquet ({exc})") from None
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"{path}: the file is empty (no rows)")
    return RawRows(rows, str(path))


READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def _concat(parts: list[RawRows], source: str) -> RawRows:
    """One split from several files; messages still name each row's own file."""
    rows, lines, origins = [], [], []
    for part in parts:
        rows += part.rows
        lines += part.line_numbers if part.line_numbers is not None else [0] * len(part.rows)
        origins += [(part.source, i + 1) for i in range(len(part.rows))]
    return RawRows(rows, source, lines if any(lines) else None, origins)


@contextlib.contextmanager
def _quiet_hub_logs():
    """A README without a YAML header makes huggingface_hub log a warning; it is not the user's."""
    import logging

    log = logging.getLogger("huggingface_hub.repocard")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _split_files(directory: Path, split: str) -> tuple[list[Path] | None, list[str]]:
    """(files of `split`, all split names) as `datasets.load_dataset(directory)` assigns them: the
    README's `configs:` header when there is one, else the hub's file-name conventions
    (`train.jsonl`, `data/train-00000-of-00001.parquet`, `train/*.json`, `test_2.parquet`, ...; a
    folder of unnamed files is the train split). None when `split` is not among them."""
    import tempfile

    import datasets
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = None
    with _quiet_hub_logs():
        try:  # the builder reads the README's configs (and makes nothing but a lock file)
            with tempfile.TemporaryDirectory(prefix="alphadpo-resolve-") as tmp:
                builder = datasets.load_dataset_builder(str(directory), cache_dir=tmp)
            files = builder.config.data_files
        except Exception:  # e.g. splits in different formats, which load_dataset refuses: read them anyway
            files = None
        if not files:
            try:
                files = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
            except Exception as exc:  # no data file at all
                raise DataError(
                    f"{directory}: no data files found ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                    "Expected .jsonl/.json/.parquet files named by split (train.jsonl, data/train-*.parquet, ...)"
                ) from None
    splits = {str(k): [Path(str(f)) for f in v] for k, v in files.items()}
    return splits.get(split), sorted(splits)


def _package_path(spec: str) -> Path:
    """`pkg:<package>/<path>`: a file or folder shipped inside an installed Python package."""
    import importlib.util

    body = spec[len("pkg:"):]
    package, _, rel = body.partition("/")
    package = package.strip().replace("-", "_")
    if not package or not all(p.isidentifier() for p in package.split(".")) or ".." in Path(rel).parts \
            or Path(rel).is_absolute():
        raise DataError(f"bad dataset reference {spec!r}: expected pkg:<python_package>/<relative path>")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec}: Python package '{package}' is not installed (the data live inside it)")
    for loc in found.submodule_search_locations:
        candidate = Path(loc) / rel
        if candidate.exists():
            return candidate
    raise DataError(f"{spec}: package '{package}' (at {list(found.submodule_search_locations)[0]}) has no {rel!r}")


def load_rows(dataset: str, split: str) -> RawRows:
    """Rows of one split from a local file, a directory, `pkg:<package>/<path>`, or the hub."""
    path = _package_path(dataset) if dataset.startswith("pkg:") else Path(dataset).expanduser()
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json or .parquet)")
        return reader(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise MissingSplitError(f"{path}: no split '{split}' (available: {', '.join(ds)})")
                ds = ds[split]
            return RawRows(ds.to_list(), f"{path}[{split}]")
        files, splits = _split_files(path, split)
        if not files:
            raise MissingSplitError(
                f"{path}: no file for split '{split}'"
                + (f" (found splits: {', '.join(splits)})" if splits else "")
            )
        if any(f.suffix.lower() not in READERS for f in files):  # other formats: datasets reads them
            import datasets

            try:
                ds = datasets.load_dataset(str(path), split=split)
            except Exception as exc:
                raise DataError(f"{path}: cannot read split '{split}' ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            return RawRows(ds.to_list(), f"{path}[{split}]")
        parts = [READERS[f.suffix.lower()](f) for f in files]
        if len(parts) == 1:
            return parts[0]
        return _concat(parts, f"{path}[{split}]")
    if dataset.startswith((".", "/", "~")) or dataset.endswith(tuple(READERS)) or dataset.count("/") > 1:
        raise DataError(f"dataset not found: {dataset}")
    return _load_hub(dataset, split)


def _load_hub(name: str, split: str) -> RawRows:
    from .hub import cached_snapshot, offline_reason

    why = offline_reason("dataset")
    if why is not None:  # without a hub: its cached copy, or one line saying what to pass
        cached = cached_snapshot(name, "dataset")
        if cached is None:
            raise DataError(
                f"dataset '{name}': no such local file or folder, and the Hugging Face hub is out of reach "
                f"({why}) with no cached copy. Pass a local .jsonl/.json/.parquet file or a folder instead "
                f"(e.g. `huggingface-cli download --repo-type dataset {name} --local-dir DIR` on a connected "
                "machine, then --dataset DIR)."
            )
        return load_rows(str(cached), split)
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as exc:
        raise DataError(f"{name}: cannot load split '{split}': {exc}") from None
    except Exception as exc:  # connection errors, missing repos
        raise DataError(
            f"{name}: no such local file or folder, and it could not be loaded from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check the name and your connection, or pass a local .jsonl/.json/.parquet file or directory."
        ) from None
    return RawRows(ds.to_list(), f"{name}[{split}]")


# ---------------------------------------------------------------------------------------------
# validation and layouts


@dataclass
class Pair:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


def check_messages(value: Any, where: str, fieldname: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{fieldname}' must be a non-empty list of messages, got {_describe(value)}")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{fieldname}[{j}]' must be a message object, got {_describe(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(f"{where}: field '{fieldname}[{j}]' has no '{key}'")
        if not isinstance(msg["role"], str):
            raise DataError(f"{where}: field '{fieldname}[{j}].role' must be a string, got {_describe(msg['role'])}")
        if not isinstance(msg["content"], str):
            raise DataError(
                f"{where}: field '{fieldname}[{j}].content' must be a string, got {_describe(msg['content'])}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _as_messages(value: Any, role: str, where: str, fieldname: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, fieldname)


REQUIRED = ("chosen", "rejected")


def to_pair(row: dict, where: str) -> Pair:
    """Normalise one row of any supported layout to (prompt, chosen, rejected) messages."""
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        cols = sorted(row)
        hints = []
        for k in missing:
            close = did_you_mean(k, cols, cutoff=0.5)
            if close is not None:
                hints.append(f"'{close}' looks like '{k}'")
        hint = f" ({'; '.join(hints)}: rename the column)" if hints else ""
        raise DataError(
            f"{where}: missing field {', '.join(repr(k) for k in missing)}{hint}. Found columns: {', '.join(cols)}. "
            "Expected chosen/rejected message lists, or prompt/chosen/rejected strings."
        )
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got {_describe(value)}")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {_describe(prompt)}")

    if isinstance(chosen, list) and isinstance(rejected, list):
        c = check_messages(chosen, where, "chosen")
        r = check_messages(rejected, where, "rejected")
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n > 0 and n < len(c) and n < len(r):
            prompt_msgs, c_resp, r_resp = c[:n], c[n:], r[n:]
        elif prompt is not None:
            prompt_msgs = _as_messages(prompt, "user", where, "prompt")
            c_resp, r_resp = c, r
            # Conversations that repeat the prompt: keep only what follows it.
            if c[: len(prompt_msgs)] == prompt_msgs and r[: len(prompt_msgs)] == prompt_msgs:
                c_resp, r_resp = c[len(prompt_msgs):], r[len(prompt_msgs):]
        elif n == min(len(c), len(r)):
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
        else:
            raise DataError(
                f"{where}: 'chosen' and 'rejected' share no prompt messages and there is no 'prompt' field"
            )
    else:
        if prompt is None:
            raise DataError(f"{where}: missing field 'prompt' (needed when chosen/rejected are strings)")
        prompt_msgs = _as_messages(prompt, "user", where, "prompt")
        c_resp = _as_messages(chosen, "assistant", where, "chosen")
        r_resp = _as_messages(rejected, "assistant", where, "rejected")

    if not c_resp or not r_resp:
        raise DataError(f"{where}: no response after the prompt in 'chosen' or 'rejected'")
    for name, resp in (("chosen", c_resp), ("rejected", r_resp)):
        if resp[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}': the last message must be the assistant's, not '{resp[-1]['role']}'")
        if not resp[-1]["content"].strip():
            raise DataError(f"{where}: field '{name}': the response is empty")
    if not any(m["content"].strip() for m in prompt_msgs):
        raise DataError(f"{where}: field 'prompt' is empty")
    if c_resp == r_resp:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return Pair(prompt_msgs, c_resp, r_resp)


def validate_rows(raw: RawRows) -> list[Pair]:
    """All rows as pairs; every problem is collected and reported together."""
    pairs, errors = [], []
    for i, row in enumerate(raw.rows):
        try:
            pairs.append(to_pair(row, raw.where(i)))
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} invalid row(s) in {raw.source}:\n  {shown}{more}")
    return pairs


# ---------------------------------------------------------------------------------------------
# templating and tokenisation


def uses_document_bos(tokenizer) -> bool:
    """Whether this model's sequences start with a document BOS: the one BOS rule, shared by
    training (`PairTokenizer`) and generation (`evaluation.generate`).

    A document BOS (Llama-3's <|begin_of_text|>, Gemma's and Mistral's <bos>/<s>) marks the start
    of a document, so it goes exactly once, first in the prompt, and never inside a response:
    Llama-3's template writes it and its tokenizer adds it again (the double-BOS trap the SimPO
    evaluation reports), and a response rendered after the prompt must not start a new document.
    It is one when the tokenizer adds it itself, or when the chat template writes it at the start
    and nowhere else. Some tokenizers name a per-turn marker as BOS (SmolLM2: <|im_start|>): the
    template writes it at every turn, so it is part of the text, left where the template puts it,
    and a truncated prompt does not get it back in front. No BOS token: nothing to do.
    """
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
    )
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if tokenizer("x").input_ids[:1] == [bos]:  # the tokenizer adds it itself
        return True
    bos_text = tokenizer.bos_token or "\0"
    rest = probe
    while rest.startswith(bos_text):
        rest = rest[len(bos_text):]
    return rest != probe and bos_text not in rest  # the template writes it first, and only there


PIPELINES = ("default", "authors")


@dataclass
class TokenizeSettings:
    max_length: int
    max_prompt_length: int
    truncation: str = "keep_end"
    # "default": this project's tokenisation; "authors": the α-DPO authors' (TRL 0.8.6), see
    # PairTokenizer.authors. Part of the tokenised-cache key like every field here.
    pipeline: str = "default"


class PairTokenizer:
    """Turns message pairs into token ids: this project's tokenisation (`render`, `__call__`), or
    with `settings.pipeline == "authors"` the α-DPO authors' own, reproduced exactly (`authors`)."""

    def __init__(self, tokenizer, settings: TokenizeSettings):
        if settings.pipeline not in PIPELINES:
            raise ConfigError(f"data.pipeline must be default or authors, not '{settings.pipeline}'")
        if settings.pipeline == "authors" and settings.truncation != "keep_end":
            raise ConfigError(
                f"data.truncation={settings.truncation} is not available with data.pipeline=authors: the "
                "authors' pipeline always truncates (keep_end)"
            )
        self.tok = tokenizer
        self.settings = settings
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no EOS token; set one before training")
        self.uses_bos = uses_document_bos(tokenizer)

    def render(self, prompt: list[dict], response: list[dict]) -> tuple[str, str]:
        tok = self.tok
        prompt_text = tok.apply_chat_template(prompt, tokenize=False)
        full_text = tok.apply_chat_template(prompt + response, tokenize=False)
        if full_text.startswith(prompt_text):
            response_text = full_text[len(prompt_text):]
        else:  # a template that rewrites earlier turns: render the response on its own
            response_text = tok.apply_chat_template(response, tokenize=False)
            if tok.bos_token and response_text.startswith(tok.bos_token):
                response_text = response_text[len(tok.bos_token):]
        # "<eos>\n" at the end of a turn: the EOS is the last token we train on.
        stripped = response_text.rstrip()
        if tok.eos_token and stripped.endswith(tok.eos_token):
            response_text = stripped
        return prompt_text, response_text

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def __call__(self, pair: Pair, where: str | None = None) -> dict:
        """One pair's token ids; `where` (e.g. "train.jsonl, row 3") only names the row in errors."""
        if self.settings.pipeline == "authors":
            return self.authors(pair, where)
        s = self.settings
        prompt_text, chosen_text = self.render(pair.prompt, pair.chosen)
        _, rejected_text = self.render(pair.prompt, pair.rejected)
        prompt = self.encode(prompt_text)
        if self.uses_bos:
            while prompt and prompt[0] == self.bos:
                prompt = prompt[1:]
            prompt = [self.bos] + prompt
        responses = []
        for text in (chosen_text, rejected_text):
            ids = self.encode(text)
            while self.uses_bos and ids and ids[0] == self.bos:
                ids = ids[1:]
            if not ids or ids[-1] != self.eos:
                ids = ids + [self.eos]
            responses.append(ids)
        chosen, rejected = responses
        prompt_truncated = response_truncated = False
        if len(prompt) > s.max_prompt_length and len(prompt) + max(len(chosen), len(rejected)) > s.max_length:
            if s.truncation != "keep_end":
                return {"_too_long": True, "prompt_len": len(prompt)}
            keep = s.max_prompt_length - (1 if self.uses_bos else 0)
            prompt = ([self.bos] if self.uses_bos else []) + prompt[len(prompt) - keep:]
            prompt_truncated = True
        budget = s.max_length - len(prompt)
        if len(chosen) > budget or len(rejected) > budget:
            chosen, rejected = chosen[:budget], rejected[:budget]
            response_truncated = True
        return {
            "prompt_ids": prompt,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "prompt_truncated": prompt_truncated,
            "response_truncated": response_truncated,
        }

    # -----------------------------------------------------------------------------------------
    # data.pipeline: authors

    def authors_texts(self, pair: Pair) -> tuple[str, str, str]:
        """Prompt, chosen and rejected text as the authors' `apply_chat_template(task="simpo")`
        makes them (alphadpo_cli keeps its own in `render`).

        The prompt is every message but the last of the chosen conversation, with an empty system
        message put first when it has none and the template mentions "system" or "<|im_start|>"
        (alignment-handbook's maybe_insert_system_message). Each response is its last message
        rendered on its own, less a leading BOS string; nothing else is removed (a template's
        default system prompt or trailing newline stays in the response, as it does for them).
        """
        tok = self.tok
        prompt = [dict(m) for m in pair.prompt + pair.chosen[:-1]]
        template = tok.get_chat_template() if tok.chat_template is not None else ""
        if prompt[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
            prompt.insert(0, {"role": "system", "content": ""})
        texts = [tok.apply_chat_template(prompt, tokenize=False)]
        for response in (pair.chosen, pair.rejected):
            text = tok.apply_chat_template(response[-1:], tokenize=False)
            if tok.bos_token and text.startswith(tok.bos_token):
                text = text[len(tok.bos_token):]
            texts.append(text)
        return texts[0], texts[1], texts[2]

    def _answer_ids(self, prompt: str, answer: str, where: str) -> tuple[list[int], list[int]]:
        """TRL 0.8.6 `build_tokenized_answer`: prompt and answer ids cut from enc(prompt + answer),
        the cut one token earlier when enc(prompt) is not a prefix of it (a merge at the boundary)."""
        full = self.encode(prompt + answer)
        alone = self.encode(prompt)
        if len(full) < len(alone):
            raise DataError(f"{where}: the prompt alone tokenises longer than prompt + response")
        start = len(alone)
        if full[:start] != alone:
            start -= 1
        return full[:start], full[start:]

    def authors(self, pair: Pair, where: str | None = None) -> dict:
        """`data.pipeline: authors`: the α-DPO authors' tokenisation (their TRL-0.8.6 `tokenize_row`)
        reproduced exactly, on this project's row format.

        1. Texts from `authors_texts`. 2. Each response's ids from `_answer_ids` (tokenised after the
        prompt text, no special tokens added). 3. BOS id put before the prompt unless it starts with
        it; EOS id appended to a response that does not end with it (no stripping of a trailing
        newline: ChatML responses end `<|im_end|>\n<|im_end|>`, as theirs do). 4. With the BOS in
        place and `longer` the longer response (computed once): if prompt + longer > max_length, the
        prompt keeps its last max_prompt_length ids (a cut prompt loses its BOS); if prompt + longer
        is then still > max_length, both responses are cut to max_length - max_prompt_length ids.
        Prompt ids are masked and every response id (assistant header and EOS included) trained, as
        the collators do for every row.

        TRL tokenises chosen and rejected each after its own copy of the prompt and trains them on
        those; this format has one prompt for both. They agree unless a tokenizer merge across the
        prompt/response boundary takes the prompt's last token into one response and not the other.
        Such a row raises DataError naming it: no shared prompt reproduces it (the extra token would
        be trained in one response, or missing from the other), and an exact-reproduction mode
        should not silently deviate. TRL itself refuses rows whose prompts differ in more than that.

        Differences that cannot be reproduced: a tokenizer without a BOS token gets none (TRL would
        put None); rows with a `prompt` column of messages and multi-message responses are reduced
        to (prompt + chosen[:-1], last chosen message, last rejected message) like conversational
        rows. Only keep_end truncation (the authors' setting; the config refuses drop and error).
        """
        s = self.settings
        where = where or f"the row whose prompt ends {pair.prompt[-1]['content'][-40:]!r}"
        prompt_text, chosen_text, rejected_text = self.authors_texts(pair)
        chosen_prompt, chosen = self._answer_ids(prompt_text, chosen_text, where)
        rejected_prompt, rejected = self._answer_ids(prompt_text, rejected_text, where)
        if chosen_prompt != rejected_prompt:
            n_c, n_r = len(chosen_prompt), len(rejected_prompt)
            refused = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt)) > 1 or abs(n_c - n_r) > 1
            raise DataError(
                f"{where}: with data.pipeline=authors, the chosen and rejected prompts tokenise differently "
                f"({n_c} vs {n_r} tokens: the tokenizer merges the end of the prompt with the start of a "
                f"response){' and TRL 0.8.6 itself refuses the row' if refused else ''}; one shared prompt "
                "cannot reproduce that. Remove the row or use data.pipeline=default."
            )
        prompt = chosen_prompt
        if self.bos is not None and (not prompt or prompt[0] != self.bos):
            prompt = [self.bos] + prompt
        chosen, rejected = [ids if ids and ids[-1] == self.eos else ids + [self.eos] for ids in (chosen, rejected)]
        longer = max(len(chosen), len(rejected))
        prompt_truncated = response_truncated = False
        if len(prompt) + longer > s.max_length:
            cut = prompt[-s.max_prompt_length:]
            prompt_truncated, prompt = len(cut) < len(prompt), cut
        if len(prompt) + longer > s.max_length:
            keep = s.max_length - s.max_prompt_length
            response_truncated = len(chosen) > keep or len(rejected) > keep
            chosen, rejected = chosen[:keep], rejected[:keep]
        return {
            "prompt_ids": prompt,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "prompt_truncated": prompt_truncated,
            "response_truncated": response_truncated,
        }


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


_CODE_SHA: dict[tuple[Path, ...], str] = {}


def tokenization_code_sha256() -> str:
    """SHA-256 of the bytes of `TOKENIZATION_SOURCES` (this module's file), computed once per
    process. The whole module rather than the source of chosen functions: no helper that the
    tokenisation calls can be left out of the key by mistake, at the price of a rebuild (seconds)
    after an edit that changes no token."""
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


def _split_fingerprint(content_fp: str, tokenizer, settings: TokenizeSettings) -> str:
    """The tokenised-cache key: the rows, the tokenizer's content, every tokenisation setting,
    the tokenisation code and the libraries that run it."""
    key = json.dumps(
        [tokenization_code_sha256(), _library_versions(), content_fp, tokenizer_fingerprint(tokenizer),
         dataclasses.asdict(settings)],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]


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
    fp = _split_fingerprint(rows_fingerprint(pairs), tokenizer, settings)
    cache = cache_home() / "tokenized" / fp
    if use_cache and (cache / "stats.json").is_file():
        from .integrity import verify_dir

        if verify_dir(cache):
            stats = DataStats(**{**json.loads((cache / "stats.json").read_text()), "cache_hit": True})
            return TokenizedSplit(datasets.load_from_disk(str(cache / "data")), fp, stats, raw.source)

    encode = PairTokenizer(tokenizer, settings)
    stats = DataStats()
    columns: dict[str, list] = {k: [] for k in ("row", "prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected")}
    too_long = []
    for i, pair in enumerate(pairs):
        out = encode(pair, raw.where(i))
        if out.get("_too_long"):
            too_long.append((i, out["prompt_len"]))
            continue
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
    ds = datasets.Dataset.from_dict(columns)
    if use_cache:
        from .integrity import seal_dir

        with atomic_dir(cache) as tmp:
            ds.save_to_disk(str(tmp / "data"))
            atomic_write_json(tmp / "stats.json", dataclasses.asdict(stats))
            seal_dir(tmp)
        ds = datasets.load_from_disk(str(cache / "data"))
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
