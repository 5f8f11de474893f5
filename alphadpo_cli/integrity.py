"""Checksums for cache directories: a cache is trusted only if every file matches its manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "MANIFEST.sha256.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_sha256(obj, length: int = 16) -> str:
    """A short hex digest of `obj` as canonical JSON (sorted keys, UTF-8, str() for the rest): a
    key for saved work that depends on `obj`."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal_dir(root: str | Path) -> None:
    """Write the manifest of `root` (call last, inside the atomic write)."""
    root = Path(root)
    manifest = {str(p.relative_to(root)): [p.stat().st_size, file_sha256(p)] for p in _files(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_dir(root: str | Path) -> bool:
    """True when `root` has a manifest and every listed file is present with the same size and hash."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    for rel, (size, digest) in manifest.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size or file_sha256(p) != digest:
            return False
    return True
