"""The output directory's lifecycle: one run per directory, and --overwrite that cannot lose the old one.

* `prepare` refuses a non-empty directory (unless --overwrite or --resume) and proves it writable
  before any compute;
* `set_previous_run_aside` (--overwrite) moves the old run's files into `.previous-run`;
* `drop_previous_run` deletes them once the new run has saved its model, so a new run that fails
  never costs the old results (`previous_run` says where they are kept);
* `record_eval_before` keeps the held-out evaluation before training (`eval_before.json`), which
  `recorded_eval_before` gives back to a resumed run instead of evaluating the initial model again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError
from ..io import atomic_write_json

PREVIOUS = ".previous-run"
WRITE_PROBE = ".write-test-"
EVAL_BEFORE = "eval_before.json"


def prepare(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to mix runs, and fail on an unwritable directory before any compute."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} exists and is not a directory")
    # (other ranks' write probes are not a previous run: they come and go while we look)
    existing = [p for p in out.iterdir() if p.name != PREVIOUS and not p.name.startswith(WRITE_PROBE)] \
        if out.is_dir() else []
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"output directory {out} is not empty. Pass --overwrite to replace it, "
            "--resume to continue from its latest checkpoint, or choose another --output-dir."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{WRITE_PROBE}{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None


def set_previous_run_aside(out: Path) -> None:
    """--overwrite: the old run's files move into `.previous-run` (replacing an older one there)."""
    old = [p for p in out.iterdir() if p.name != PREVIOUS]
    if not old:
        return
    aside = out / PREVIOUS
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for p in old:
        os.replace(p, aside / p.name)


def drop_previous_run(out: Path) -> None:
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)


def previous_run(out: Path) -> Path | None:
    """Where the previous run's files are kept, if they are."""
    aside = out / PREVIOUS
    return aside if aside.is_dir() else None


def record_eval_before(out: Path, report: dict | None, key: dict) -> None:
    """Keep the held-out report of the model before training, with what it was computed on (`key`:
    the held-out split's and the model's fingerprints)."""
    atomic_write_json(out / EVAL_BEFORE, {"key": key, "report": report})


def recorded_eval_before(dirs, key: dict) -> tuple[dict, Path] | None:
    """(the report `record_eval_before` kept, its file) from the first of `dirs` that has one for the
    same `key` (the same held-out split and model), else None."""
    for d in dirs:
        path = Path(d) / EVAL_BEFORE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("key") == key and isinstance(data.get("report"), dict):
            return data["report"], path
    return None
