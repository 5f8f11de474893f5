"""Small helpers shared by the multi-process test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import json
import socket
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the only address the multi-process tests use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run directory's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
