"""What a comparison shows: `<out>/compare.json` (everything: `summary.summarise`), the tables on
stdout (the methods at their chosen settings, mean ± SE over seeds; the grid as validation saw it;
the paired reward differences with their 95% intervals) and the plots: `compare.png` (methods ×
metric, 95% intervals) and, with a grid, `grid.png` (validation accuracy against the swept value)."""

from __future__ import annotations

from .. import results as shared
from ..io import atomic_write_json
from .summary import summarise


def table_cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the main table: compare.json's `results` section as every results table
    shows it (`alphadpo_cli.results`): the base model first, then one row per method."""
    return shared.table_cells(result["results"])


def _ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def print_tables(result: dict, out) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    headers, rows = table_cells(result)
    grid = "; ".join(f"{g['method'] + ':' if g['method'] else ''}{g['key']} ∈ {g['values']}" for g in result["grid"])
    title = escape(f"{result['preset'] or result['config_file']}: {len(result['seeds'])} seed(s), test = "
                   f"{result['test']['data']} [{result['test']['split']}]" + (f"; grid {grid}" if grid else ""))
    t = Table(title=title, box=box.SIMPLE_HEAD, caption="mean ± SE over the n units (methods: seeds; the base model's reward: the test "
              "prompts); 95% t-intervals in compare.json"
              + ("; setting: chosen on the validation pairs" if grid else ""))
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    if not out.is_terminal:  # a log file or a pipe: no need to squeeze into 80 columns (a grid adds columns)
        from rich.console import Console

        out = Console(width=max(out.width, 200))
    out.print(t)
    if grid:
        _print_grid(result, out)
    if result["paired"]:
        p = Table(title="paired per-prompt reward difference (same test prompts, seed paired with seed)",
                  box=box.SIMPLE_HEAD)
        for h in ("difference", "mean", "95% CI (prompt×seed pairs)", "95% CI (seeds)", "pairs"):
            p.add_column(h, justify="left" if h == "difference" else "right")
        for d in result["paired"]:
            p.add_row(f"{d['method']} − {d['baseline']}", f"{d['mean']:+.3f}", _ci(d["ci95_pairs"]),
                      _ci(d["ci95_seeds"]), str(d["n_pairs"]))
        out.print(p)


def _print_grid(result: dict, out) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title="the grid on the validation pairs (chooses; the test set never does)", box=box.SIMPLE_HEAD)
    for h in ("method", "setting", "pref acc (val)", "acc vs ref (val)", ""):
        t.add_column(h, justify="left" if h in ("method", "setting") else "right")
    for m in result["methods"]:
        for row in m["grid"] or []:
            t.add_row(m["method"], row["name"], shared.cell("accuracy", row["accuracy"]), shared.cell("accuracy", row["accuracy_ref"]),
                      "◀ chosen" if row["point"] == m["point"] else "")
    out.print(t)


def finish(c) -> dict:
    """compare.json, the tables and the plots from the work log."""
    from ..console import console
    from .plots import plot_grid, plot_methods

    result = summarise(c)
    result["plots"] = [str(p) for p in (plot_methods(result, c.out / "compare.png"),
                                        plot_grid(result, c.out / "grid.png")) if p is not None]
    atomic_write_json(c.out / "compare.json", result)
    if not c.opts.quiet:
        print_tables(result, console(stderr=False))
        c.say(f"results: {c.out / 'compare.json'}; plots: {', '.join(result['plots']) or 'none'}")
    return result
