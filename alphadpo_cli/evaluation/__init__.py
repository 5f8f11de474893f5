"""Evaluation: AlpacaEval 2, Arena-Hard v0.1 and an offline held-out preference report.

    from alphadpo_cli.evaluation import evaluate
    evaluate("alpacaeval", model="outputs/run", judge_base_url="http://127.0.0.1:8000/v1", judge_model="judge")
    evaluate("arena-hard", model="outputs/run", judge=False)          # answers only
    evaluate("preference", model="outputs/run", data="examples/demo")  # no judge, runs on a laptop

Each returns a dict (also saved as JSON in the output directory). `alphadpo eval ...` is a thin
shell over these functions. Nothing here imports torch until a model is loaded.
"""

from __future__ import annotations

from typing import Any

BENCHMARKS = ("alpacaeval", "arena-hard", "preference")


def run_alpacaeval(**options: Any) -> dict:
    from .alpacaeval import run_alpacaeval as run

    return run(**options)


def run_arena_hard(**options: Any) -> dict:
    from .arenahard import run_arena_hard as run

    return run(**options)


def run_preference(**options: Any) -> dict:
    from .preference import run_preference as run

    return run(**options)


def evaluate(kind: str, **options: Any) -> dict:
    """Run one benchmark: "alpacaeval", "arena-hard" (or "arena_hard") or "preference"."""
    key = kind.replace("_", "-").lower()
    if key == "alpacaeval":
        return run_alpacaeval(**options)
    if key == "arena-hard":
        return run_arena_hard(**options)
    if key == "preference":
        return run_preference(**options)
    from ..config import ConfigError

    raise ConfigError(f"unknown evaluation '{kind}' (one of: {', '.join(BENCHMARKS)})")


__all__ = ["BENCHMARKS", "evaluate", "run_alpacaeval", "run_arena_hard", "run_preference"]
