"""The package's imports form a DAG, layer by layer:

    base (config, data, losses, io, ...) ← kernels ← models ← logps ← {train, evaluation, margins}
    ← rewards (it generates through evaluation's shared generation code) ← iterate (the online rounds:
    train, rewards and evaluation together), compare (methods × grid × seeds: the same three, through their
    APIs) ← cli

Counted are all imports, the ones inside functions too: a function-level import that exists only to
dodge a cycle would show here as the cycle it hides."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "alphadpo_cli"
# subpackage -> the package parts it may import (besides itself and the base modules)
LAYERS = {
    "kernels": set(),
    "models": {"kernels"},
    "logps": {"kernels", "models"},
    "train": {"kernels", "models", "logps"},
    "evaluation": {"kernels", "models", "logps"},
    "margins": {"kernels", "models", "logps"},
    "rewards": {"kernels", "models", "logps", "evaluation"},
    "iterate": {"kernels", "models", "logps", "train", "evaluation", "rewards"},
    "compare": {"kernels", "models", "logps", "train", "evaluation", "margins", "rewards"},
    "cli": {"kernels", "models", "logps", "train", "evaluation", "margins", "rewards", "iterate", "compare"},
}


def _module(path: Path) -> str:
    parts = ["alphadpo_cli", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    here = _module(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{mod}.{alias.name}"
                out.add(sub if _exists(sub) else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "alphadpo_cli" or m.startswith("alphadpo_cli.")}


def _exists(mod: str) -> bool:
    p = PKG.parent / mod.replace(".", "/")
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if "demo" not in p.parts]
    return {_module(p): _imports(p) - {_module(p)} for p in files}


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def test_the_module_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n == "alphadpo_cli" and m != "alphadpo_cli":
                continue  # the package root only re-exports lazily (`__getattr__`)
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_each_layer_imports_only_the_layers_below():
    bad = []
    for mod, deps in _graph().items():
        part = _part(mod)
        if mod == "alphadpo_cli":
            continue  # the package root re-exports the API (train, evaluate) lazily, as the cli does
        for d in deps:
            other = _part(d)
            if d == "alphadpo_cli" or other == part:
                continue
            allowed = LAYERS.get(part)
            if part == "base":
                ok = other == "base"
            else:
                ok = other == "base" or other in allowed
            if not ok:
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_kernels_import_nothing_from_the_package():
    """kernels/ is the floor: its modules import one another, nothing else of the package."""
    for p in (PKG / "kernels").rglob("*.py"):
        outside = {m for m in _imports(p) if not (m == "alphadpo_cli.kernels" or m.startswith("alphadpo_cli.kernels."))}
        assert not outside, p
