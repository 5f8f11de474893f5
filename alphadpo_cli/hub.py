"""Can the Hugging Face hub be reached? Asked once per process, answered within a few seconds.

Without a network the hub libraries retry every request with exponential back-off (about 30 s of
URLs per file). Before a hub id is handed to them, `offline_reason()` says whether the hub is out
of reach:

* ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` for models, ``HF_DATASETS_OFFLINE`` for data
  sets, ``ALPHADPO_OFFLINE`` for everything) set to 1: offline, no probe;
* otherwise one TCP connection to the hub's own host (``HF_ENDPOINT``, default huggingface.co,
  port 443), with a short timeout (``ALPHADPO_HUB_PROBE_TIMEOUT`` seconds, default 3). Nothing
  is sent, and no other host is contacted. Behind a proxy (``HTTPS_PROXY`` and friends) the hub
  is not probed: the proxy decides, and the libraries are left to it.

The answer is kept for the rest of the process. When the hub is out of reach, a copy already in
the local hub cache is still used (`cached_snapshot`, which never touches the network); else the
caller prints one line saying what to pass instead.

Which commit of a repository is meant (`hub_commit`, `snapshot_commit`) is read from the local
hub cache, the same online and offline: the cache's `refs/<revision>` for an id, the snapshot
folder's name for a path inside it. Caches of work done with a hub model are keyed by it.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["cached_snapshot", "hub_commit", "hub_host", "offline_reason", "online_commit", "reset", "snapshot_commit"]

_TRUE = {"1", "ON", "YES", "TRUE"}
_FLAGS = {
    "model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ALPHADPO_OFFLINE"),
    "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ALPHADPO_OFFLINE"),
    "file": ("HF_HUB_OFFLINE", "ALPHADPO_OFFLINE"),
}
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_probed: dict[tuple[str, int], str | None] = {}
_lock = threading.Lock()


def hub_host() -> tuple[str, int]:
    """(host, port) of the hub endpoint in use (HF_ENDPOINT, default https://huggingface.co)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "huggingface.co", port


def _probe_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get("ALPHADPO_HUB_PROBE_TIMEOUT", "3")))
    except ValueError:
        return 3.0


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` (name lookup included)."""
    result: list[str | None] = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(exc.strerror or type(exc).__name__)

    worker = threading.Thread(target=connect, daemon=True)  # a hung DNS lookup must not hold us
    worker.start()
    worker.join(timeout + 0.5)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def offline_reason(kind: str = "model") -> str | None:
    """Why the hub cannot be reached (one short phrase), or None when it can.

    `kind` ("model", "dataset", "file") chooses which offline variables count."""
    for var in _FLAGS.get(kind, _FLAGS["file"]):
        if (os.environ.get(var) or "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    if any(os.environ.get(v) for v in _PROXIES):
        return None
    host, port = hub_host()
    with _lock:
        if (host, port) not in _probed:
            timeout = _probe_timeout()
            why = _probe(host, port, timeout)
            _probed[(host, port)] = None if why is None else f"{host}:{port} cannot be reached: {why}"
        return _probed[(host, port)]


def reset() -> None:
    """Forget the probe's answer (tests; a process whose network came back)."""
    with _lock:
        _probed.clear()


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path | None:
    """The local hub cache's copy of a repository (its main revision, or `revision`), without any
    network access; None when nothing is cached."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except Exception:  # not cached, or a malformed id: the same for the caller
        return None
    path = Path(path)
    return path if path.is_dir() and any(path.iterdir()) else None


_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def snapshot_commit(path: str | os.PathLike) -> tuple[str, str] | None:
    """(repository folder name, commit) when `path` is a snapshot folder of the hub cache
    (``<cache>/models--owner--name/snapshots/<commit>``, the documented layout), else None."""
    p = Path(path).expanduser().absolute()
    if p.parent.name == "snapshots" and (p.parent.parent / "refs").is_dir() and "--" in p.parent.parent.name \
            and _COMMIT_RE.match(p.name):
        return p.parent.parent.name, p.name
    return None


def hub_commit(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The commit that `revision` (default main) of `repo_id` resolves to in the local hub cache,
    without any network access: what from_pretrained loads offline, and, once it has downloaded
    the files online, what it loaded (a download records the commit it fetched in refs/). None
    when nothing of the repository is cached."""
    path = cached_snapshot(repo_id, repo_type, revision=revision)
    found = snapshot_commit(path) if path is not None else None
    return found[1] if found else None


def online_commit(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The commit the hub itself names for `revision` of `repo_id` (one request), or None when it
    cannot be asked (offline, or any failure). Only for an id that nothing has downloaded yet."""
    if offline_reason(repo_type if repo_type in _FLAGS else "file") is not None:
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
    except Exception:  # not found, private, no network after all: no commit
        return None
    sha = getattr(info, "sha", None)
    return sha if isinstance(sha, str) and _COMMIT_RE.match(sha) else None
