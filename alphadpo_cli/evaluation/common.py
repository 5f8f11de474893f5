"""Shared plumbing for the benchmarks: output layout, options from keywords, downloads.

Every result file is either rewritten atomically (`atomic_write_json`, its identity beside it by
`artefacts.claim_identity`) or appended one complete line at a time and fsynced
(`artefacts.WorkLog`), so a run killed at any moment leaves files the next run can resume from:
at worst the last, half-written line of a log is ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from ..data import DataError
from ..io import atomic_path, cache_home


def eval_cache_dir(*parts: str) -> Path:
    """Where downloaded benchmark files live: `cache_home()/eval/...` (never site-packages)."""
    return cache_home().joinpath("eval", *parts)


def model_label(model: str | None, adapter: str | None = None) -> str:
    """A short, filesystem-safe name for a model (+adapter): the generator name and output folder."""
    ref = adapter or model or "model"
    ref = str(ref).rstrip("/")
    if ref.startswith("pkg:"):
        ref = ref.split("/")[-1]
    name = Path(ref).name if ("/" in ref and Path(ref).exists()) or ref.startswith((".", "/", "~")) else ref
    name = name.replace("/", "__")
    name = re.sub(r"\.gguf$", "", name)
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "model"
    return name


def default_output_dir(label: str, benchmark: str) -> Path:
    return Path("outputs") / "eval" / label / benchmark


def package_dir(name: str) -> Path | None:
    """A package's directory, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------
# an eval command's options from the flat keywords of `evaluate()`

#: flat keyword -> (part of the command's options, field of that part)
FLAT_OPTIONS = {
    **{k: ("model", k) for k in ("model", "adapter", "preset", "dtype", "backend")},
    **{k: ("decoding", k) for k in ("temperature", "top_p", "max_new_tokens", "batch_size", "seed")},
    "judge": ("judge", "enabled"), "rejudge_malformed": ("judge", "rejudge_malformed"),
    **{f"judge_{k}": ("judge", k) for k in ("base_url", "model", "api_key_env", "concurrency", "max_retries",
                                            "timeout", "backoff")},
    **{k: ("output", k) for k in ("output_dir", "name", "overwrite", "quiet")},
}


def options_from_kwargs(cls, kwargs: dict):
    """`cls(...)` (an eval command's options: parts `model`, `decoding`, `judge`, `output` and its
    own fields) from flat keywords, as `evaluate("alpacaeval", model=..., judge_model=...)` takes
    them. A keyword that is a field of `cls` itself goes there first (Arena-Hard's `seed` is its
    bootstrap seed); an unknown keyword is a TypeError, as for any function."""
    import dataclasses

    from . import options as parts_module

    part_types = {"model": parts_module.ModelSpec, "decoding": parts_module.DecodingOptions,
                  "judge": parts_module.JudgeOptions, "output": parts_module.OutputOptions}
    names = {f.name for f in dataclasses.fields(cls)}
    top: dict = {}
    parts: dict[str, dict] = {}
    for key, value in kwargs.items():
        part, field = FLAT_OPTIONS.get(key, (None, None))
        if key in names and key not in part_types:
            top[key] = value
        elif part in names:
            parts.setdefault(part, {})[field] = value
        else:
            raise TypeError(f"{cls.__name__}: unknown option {key!r}")
    top.update({part: part_types[part](**values) for part, values in parts.items()})
    return cls(**top)


# ---------------------------------------------------------------------------------------------
# JSON / JSONL


def read_json_rows(path: Path, what: str) -> list[dict]:
    """A list of objects from .json (a list, or an object holding one list) or .jsonl."""
    from ..data import read_json, read_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    raw = read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_json(path)
    return raw.rows


def write_json_records(path: Path, rows: list[dict]) -> None:
    """alpaca_eval-style JSON (a list of records, indent 2), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """JSONL (one record a line), written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    import csv

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


# ---------------------------------------------------------------------------------------------
# downloads


def download_url(url: str, dest: Path, *, what: str, hint: str, timeout: float = 60.0) -> Path:
    """Fetch `url` once into `dest` (atomically); later calls reuse the file."""
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    offline = os.environ.get("ALPHADPO_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        if offline:
            raise urllib.error.URLError("offline mode: HF_HUB_OFFLINE=1 or ALPHADPO_OFFLINE=1 is set")
        req = urllib.request.Request(url, headers={"User-Agent": "alphadpo"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, atomic_path(dest) as tmp:
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {what} from {url} ({reason}). {hint}") from None
    return dest


class HubUnreachable(DataError):
    """A hub file that is not cached while the hub is out of reach."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def hub_dataset_file(repo_id: str, filename: str, dest: Path, *, what: str, hint: str) -> Path:
    """A raw file of a hub *dataset repository* (not its loading script), copied once to `dest`."""
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    from ..hub import offline_reason

    why = offline_reason("file")  # probed once per process: no retries with back-off for each file
    try:
        from huggingface_hub import hf_hub_download

        got = hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset",
                              cache_dir=str(eval_cache_dir("hf")), local_files_only=why is not None)
    except Exception as exc:  # offline, missing file, auth: all end the same way for the user
        if why is not None:
            raise HubUnreachable(
                f"could not download {what} ({repo_id}/{filename}): the Hugging Face hub is out of reach ({why}). {hint}",
                why) from None
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"could not download {what} ({repo_id}/{filename} from the Hugging Face hub: {msg}). {hint}"
        ) from None
    with atomic_path(dest) as tmp:
        shutil.copyfile(got, tmp)
    return dest


def mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


