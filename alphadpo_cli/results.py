"""One results format for the experiments: `alphadpo compare` (compare.json) and `alphadpo iterate`
(rounds.json) each carry a ``results`` section in it, read back by `read_results` and printed by
`results_table`, so a comparison of methods and a run of online rounds line up column by column.

A section::

    {"format": "alphadpo.results/1",
     "baseline": "base model",             # the row the win rates are against
     "rows": [{"name": "alpha_dpo", "kind": "method", "setting": "alpha=0.05", "model": [...],
               "metrics": {"mean_reward": {"mean": .., "se": .., "n": 3, "sd": .., "ci95": [lo, hi],
                                           "unit": "seeds"}, ...}}, ...],
     "paired": [{"method": .., "baseline": .., "metric": "mean_reward", "mean": .., "ci95_pairs": ..}, ...]}

`kind` is one of "base" (the model every row started from: compare's base model, iterate's π0),
"method" (compare: one loss at its chosen setting, over seeds), "round" (iterate: round k) and
"offline" (iterate: the same budget from π0 in one round). Every metric is an estimate: its mean,
and where there is one its standard error, the number of units and the 95% t-interval, with the
`unit` the spread is over: "seeds" (compare: one number per seed's run) or "prompts" (iterate: one
model, its per-prompt rewards). The metric names are shared: `METRICS`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FORMAT = "alphadpo.results/1"
KINDS = ("base", "method", "round", "offline")

#: The shared metric names and their column headers, in table order.
METRICS = {"accuracy": "acc (test)", "validation_accuracy": "acc (val)", "mean_reward": "reward",
           "win_rate": "win vs base", "win_vs_previous": "win vs prev", "constraints_satisfied": "constraints",
           "all_constraints_satisfied": "all met", "length_tokens": "tokens"}
#: Metrics that are shares, shown as percentages.
SHARES = {"win_rate", "win_vs_previous", "constraints_satisfied", "all_constraints_satisfied"}


def t_quantile(df: int) -> float:
    """t(0.975, df): the two-sided 95% critical value (compare's intervals use it too)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def estimate(mean: float | None, se: float | None = None, n: int | None = None, *, unit: str | None = None,
             sd: float | None = None, ci95: list[float] | None = None) -> dict | None:
    """One metric's estimate; with `se` and `n` > 1 and no `ci95`, the 95% t-interval mean ± t·se.
    None when there is no mean."""
    if mean is None:
        return None
    if ci95 is None and se is not None and n is not None and n > 1:
        half = t_quantile(n - 1) * se
        ci95 = [mean - half, mean + half]
    if sd is None and se is not None and n:
        sd = se * math.sqrt(n)
    return {"mean": float(mean), "se": se, "n": n, "sd": sd, "ci95": ci95, "unit": unit}


def with_unit(interval: dict | None, unit: str) -> dict | None:
    """`compare.stats.interval`'s {n, mean, sd, se, ci95} as an estimate over `unit`."""
    return None if interval is None else {**interval, "unit": unit}


def row(name: str, kind: str, metrics: dict, *, setting: str | None = None, model=None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"results row {name!r}: kind {kind!r} is not one of {KINDS}")
    return {"name": name, "kind": kind, "setting": setting, "model": model,
            "metrics": {k: v for k, v in metrics.items() if v is not None}}


def section(rows: list[dict], *, baseline: str, paired: list[dict] | None = None) -> dict:
    return {"format": FORMAT, "baseline": baseline, "rows": rows, "paired": list(paired or [])}


def read_results(path: str | Path) -> dict:
    """The results section of a compare.json or rounds.json (or of a file holding only a section)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    found = data if data.get("format") == FORMAT else data.get("results")
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise ValueError(f"{path}: no results section in the {FORMAT} format (written by alphadpo compare or "
                         "alphadpo iterate)")
    return found


def cell(key: str, est: dict | None) -> str:
    """mean ± SE as the table shows it (shares in %, lengths with one decimal)."""
    if not est or est.get("mean") is None:
        return "-"
    scale, fmt = (100, ".1f") if key in SHARES else (1, ".1f" if key == "length_tokens" else ".3f")
    text = format(scale * est["mean"], fmt) + ("%" if key in SHARES else "")
    return text + ("" if est.get("se") is None else f" ± {format(scale * est['se'], fmt)}")


def table_cells(results: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): name, setting, units (n and what they are), then every metric some row has."""
    rows = results["rows"]
    keys = [k for k in METRICS if any((r["metrics"].get(k) or {}).get("mean") is not None for r in rows)]
    headers = ["model", "setting", "n", *(METRICS[k] for k in keys)]
    out = []
    for r in rows:
        units = {(e.get("n"), e.get("unit")) for e in r["metrics"].values() if e and e.get("se") is not None}
        n = ", ".join(f"{n} {u}" for n, u in sorted(units, key=str)) if units else ""
        out.append([r["name"], r.get("setting") or "", n, *(cell(k, r["metrics"].get(k)) for k in keys)])
    return headers, out


def results_table(results: dict, title: str = "", caption: str | None = None):
    """The section as a rich table: one row per model, mean ± SE per metric."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    headers, rows = table_cells(results)
    t = Table(title=escape(title) if title else None, title_justify="left", box=box.SIMPLE_HEAD,
              caption=caption or f"mean ± SE (n: the units the SE is over; 95% intervals in the JSON); "
                                 f"win rates against {results['baseline']}", caption_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    return t
