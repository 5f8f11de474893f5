"""Resume, reuse, or refuse: one mechanism for every artefact a later run picks up.

An artefact on disk belongs to an *identity* (a JSON-able dict: the model, the decoding, the reward,
the code that made it). A later run with the same identity reuses or resumes it; with another
identity it is refused with one message that lists what changed, unless the user asks to start over
(`--overwrite`). Two shapes cover every artefact the package keeps:

* `WorkLog`: an append-only JSONL log whose first line is a header naming its identity. Each record
  is one line, flushed and fsynced before `append` returns, so a process killed at any moment loses
  at most the line it was writing. That torn last line is dropped when the log is read and cut off
  when it is opened for appending; a damaged line anywhere else is an error naming it. The judges'
  logs, the reward-score cache, the generations of `data build` and `alphadpo iterate`'s rounds are
  work logs.
* `SealedDirCache`: directories by content key, each written under a temporary name, sealed with a
  checksum manifest (`integrity.seal_dir`) and renamed into place; one that does not verify (a kill
  mid-write, a disk error, an edit) is treated as absent and built again. The tokenised data and the
  reference log-probs are sealed-directory caches: their key *is* their identity.

`claim_identity` is the same rule for an artefact rewritten whole (a JSON file written atomically,
such as generated answers with their metadata): its identity is recorded in a small JSON file next
to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .config import ConfigError
from .integrity import seal_dir, verify_dir
from .io import atomic_dir, atomic_path, atomic_write_json

FORMAT = "alphadpo.worklog/1"
OVERWRITE_HINT = "pass --overwrite to start again, or choose another output directory"

T = TypeVar("T")


class ArtefactError(ConfigError):
    """An artefact on disk that cannot be used as it is: another identity, or damage."""


class IdentityMismatch(ArtefactError):
    """The artefact was made with other settings; `changes` says which, old and new."""

    def __init__(self, message: str, changes: str):
        super().__init__(message)
        self.changes = changes


def normalised(identity: Any) -> Any:
    """The identity as it reads back from JSON (tuples become lists, paths and other objects strings)."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def describe_changes(old: Any, new: Any, prefix: str = "") -> str:
    """What differs between two identities, key by key: 'decoding.temperature: 0.8 there, 0.5 now; …'."""
    old, new = normalised(old), normalised(new)
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [describe_changes(old.get(k), new.get(k), f"{prefix}{k}.") for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        return "; ".join(parts)
    return f"{prefix.rstrip('.') or 'value'}: {json.dumps(old)} there, {json.dumps(new)} now"


def check_identity(where: str | Path, old: Any, new: Any, *, what: str = "was made with other settings",
                   hint: str = OVERWRITE_HINT) -> None:
    """Raise `IdentityMismatch` naming `where` and every change, unless `old` and `new` agree."""
    if normalised(old) == normalised(new):
        return
    changes = describe_changes(old, new)
    raise IdentityMismatch(f"{where} {what} ({changes}); {hint}", changes)


# ---------------------------------------------------------------------------------------------
# append-only JSONL work logs


def read_lines(path: str | Path) -> list[Any]:
    """The JSON values of a JSONL file, one per non-empty line. A torn last line (the process was
    killed while writing it) is dropped; a damaged line elsewhere raises `ArtefactError` naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n >= len(lines) - 1:  # the last line, with or without its newline: torn by a kill
                break
            raise ArtefactError(f"{path}: line {n} is not valid JSON (the file was damaged). Delete that line, "
                                "or the file to start over.") from None
    return out


def _is_header(value: Any) -> bool:
    return isinstance(value, dict) and value.get("format") == FORMAT and "identity" in value


def _cut_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (it holds no record): records appended now must not
    follow it on the same line, where it would be damage."""
    size = path.stat().st_size
    if not size:
        return
    with open(path, "r+b") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())


class WorkLog:
    """An append-only JSONL log of one identity.

    Opening it checks the header against `identity`: the same, and its records are loaded
    (`records`) for the caller to resume from; another, and `IdentityMismatch` lists the changes,
    unless `overwrite`, which deletes the log and starts a new one. A log written before headers
    existed (no header line) is adopted when `adopt_headerless` is true (its records are kept and
    the header is put in front, atomically), else refused like another identity.

    `kind` names the artefact in the header and in messages ("AlpacaEval judge log").
    """

    def __init__(self, path: str | Path, identity: Any, *, kind: str, overwrite: bool = False,
                 adopt_headerless: bool = False, hint: str = OVERWRITE_HINT):
        self.path, self.identity, self.kind = Path(path), normalised(identity), kind
        self._fh = None
        if overwrite and self.path.exists():
            self.path.unlink()
        values = read_lines(self.path)
        if values and _is_header(values[0]):
            check_identity(self.path, values[0]["identity"], self.identity,
                           what=f"({kind}) was written with other settings", hint=hint)
            values = values[1:]
        elif values and not adopt_headerless:
            raise ArtefactError(f"{self.path} ({kind}) has no identity header, so what made it is unknown; {hint}")
        elif values:
            self._rewrite_with_header(values)
        self.records: list[dict] = [v for v in values if isinstance(v, dict)]

    @classmethod
    def read(cls, path: str | Path, identity: Any, *, kind: str) -> list[dict]:
        """The records of a log of this identity, without opening it for writing: [] when it is
        absent or of another identity (a reader that only takes what matches, e.g. another shard's log)."""
        values = read_lines(path)
        if not values or not _is_header(values[0]) or normalised(values[0]["identity"]) != normalised(identity):
            return []
        return [v for v in values[1:] if isinstance(v, dict)]

    @staticmethod
    def header_identity(path: str | Path) -> Any | None:
        """The identity named in a log's header line; None for an absent log or one without a header."""
        try:
            with open(path, "rb") as fh:
                first = json.loads(fh.readline())
        except (OSError, ValueError):
            return None
        return first["identity"] if _is_header(first) else None

    def _header(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "identity": self.identity}

    def _rewrite_with_header(self, values: list) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                for v in [self._header(), *values]:
                    fh.write(json.dumps(v, ensure_ascii=False, default=str) + "\n")

    def _open(self):
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0
            if not fresh:
                _cut_torn_tail(self.path)
                fresh = self.path.stat().st_size == 0
            self._fh = open(self.path, "a", encoding="utf-8")
            if fresh:
                self._write([self._header()])
        return self._fh

    def _write(self, values: Iterable[Any]) -> None:
        fh = self._fh
        for v in values:
            fh.write(json.dumps(v, ensure_ascii=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def append(self, record: dict) -> None:
        """Add one record; it is on disk when this returns."""
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        """Add several records with one fsync (a kill loses at most the one being written)."""
        records = list(records)
        self._open()
        self._write(records)
        self.records.extend(records)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "WorkLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


# ---------------------------------------------------------------------------------------------
# artefacts rewritten whole


def claim_identity(identity_file: str | Path, identity: Any, *, overwrite: bool = False,
                   artefacts: Iterable[str | Path] = (), kind: str = "output", hint: str = OVERWRITE_HINT) -> dict | None:
    """The record saved in `identity_file` (a JSON object with an "identity" field) when it matches
    `identity`; None when there is none yet. Another identity raises `IdentityMismatch` unless
    `overwrite`, which deletes `identity_file` and the `artefacts` it describes. The caller writes
    the record with `save_identity` once it has something to keep."""
    identity_file = Path(identity_file)
    if overwrite:
        for p in (*map(Path, artefacts), identity_file):
            if p.is_file():
                p.unlink()
    if not identity_file.is_file():
        return None
    try:
        record = json.loads(identity_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ArtefactError(f"{identity_file} is not valid JSON (the file was damaged); {hint}") from None
    old = record.get("identity") if isinstance(record, dict) else None
    check_identity(next(iter(map(Path, artefacts)), identity_file), old, identity,
                   what=f"({kind}) was made with other settings", hint=hint)
    return record


def save_identity(identity_file: str | Path, identity: Any, **extra: Any) -> None:
    """Write `{"identity": identity, **extra}` atomically."""
    atomic_write_json(identity_file, {"identity": normalised(identity), **extra})


# ---------------------------------------------------------------------------------------------
# sealed directories by content key


class SealedDirCache:
    """Directories by key under `root`, each complete or absent.

    `save` writes one under a temporary name, seals it with a checksum manifest and renames it into
    place; `load` returns None unless the manifest verifies, so a directory left by a kill mid-write,
    or damaged since, is simply built again. The key must cover everything the content depends on.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, read: Callable[[Path], T | None]) -> T | None:
        """`read(directory)` of a sealed, verified entry, or None. `read` may itself return None
        (content that does not fit the caller, e.g. another row count) to mean a miss."""
        path = self.path(key)
        if not path.is_dir() or not verify_dir(path):
            return None
        return read(path)

    def save(self, key: str, write: Callable[[Path], None]) -> Path:
        """Run `write(tmp_dir)`, seal the result and rename it into place; returns the entry's path."""
        with atomic_dir(self.path(key)) as tmp:
            write(tmp)
            seal_dir(tmp)
        return self.path(key)

    def get_or_build(self, key: str, build: Callable[[], T], *, read: Callable[[Path], T | None],
                     write: Callable[[T, Path], None], agree: Callable[[bool], bool] | None = None,
                     save: bool = True) -> tuple[T, bool]:
        """(value, hit): the stored value when there is one, else `build()`, saved unless `save` is
        false. `agree(hit)` makes several processes take the same branch (a hit only where every
        process has one); `save=False` on all but the process that writes."""
        value = self.load(key, read)
        hit = value is not None if agree is None else agree(value is not None)
        if hit:
            return value, True
        value = build()
        if save:
            self.save(key, lambda tmp: write(value, tmp))
        return value, False
