"""Small helpers shared by the multi-process test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the only address the multi-process tests use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run directory's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _spawned(rank: int, world: int, port: int, fn: Callable, out: str, kwargs: dict) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo",
                       # without it accelerate runs each spawned process as a single one
                       "ACCELERATE_USE_CPU": "true"})
    torch.set_num_threads(1)
    result = fn(Path(out) / "run", **kwargs)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_in_two_processes(fn: Callable, out: Path, **kwargs: Any) -> list:
    """``fn(out / "run", **kwargs)`` in 2 spawned processes (gloo on 127.0.0.1, accelerate on the CPU,
    one thread each); each rank's return value, rank 0 first. `fn` must be a module-level function."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(2, free_port(), fn, str(out), kwargs), nprocs=2, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
