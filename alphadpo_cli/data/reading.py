"""Reading a split's rows: JSON Lines, JSON, Parquet, a folder split as the hub splits it, a
`datasets.save_to_disk` folder, `pkg:<package>/<path>`, or a hub id (its cached copy offline).
Every problem names the file and, where there is one, the line."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, MissingSplitError


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
    from ..hub import cached_snapshot, offline_reason

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

