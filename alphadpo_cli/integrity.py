"""Checksums: a cache is trusted only if every file matches its manifest (`seal_dir`, `verify_dir`);
keys for saved work (`json_sha256`); the content hash of a file, remembered (`content_sha256`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "MANIFEST.sha256.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file's content (hex), remembered across processes.

    The whole file is read once (about 1 GB/s); the digest is kept under
    cache_home()/file-hashes, keyed by the file's real path and stamped with its device, inode,
    size, mtime and ctime. The file is read again whenever any of those differs: a touched file
    (same content, new times) is hashed again and gives the same digest, and a rewrite always
    changes the ctime, which no program can set back. So the digest is that of the content; the
    stamp only spares reading an unchanged file twice."""
    from .io import atomic_write_json, cache_home

    real = Path(path).resolve()
    st = real.stat()
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = cache_home() / "file-hashes" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved.get("path") == str(real) and saved.get("stamp") == stamp and len(saved.get("sha256", "")) == 64:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = file_sha256(real)
    try:
        atomic_write_json(memo, {"path": str(real), "stamp": stamp, "sha256": digest})
    except OSError:  # a read-only cache: the digest is still right, only not remembered
        pass
    return digest


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
