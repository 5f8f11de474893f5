"""`alphadpo margins` in the terminal: rich tables of a :class:`~alphadpo_cli.margins.report.MarginReport`
(per-pair quantities, one row per series, the top and bottom pairs), a unicode histogram, a
training run's metrics, and the scoring progress bars.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..console import Bars
from .report import MarginReport, RunInfo
from .series import correlation, describe, norm_description


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if abs(x) < 1e-12:
            return "0"
        return f"{x:.{digits}g}"
    return str(x)


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


class ScoringProgress:
    """One bar per scoring pass, on stderr, cleared when done; silent when stderr is not a terminal.
    Called as `progress(what, done, total)`."""

    def __init__(self, out: Console):
        self.bars = Bars(out, transient=True, disable=not out.is_terminal, label="[bold]{task.description}",
                         eta_only=True)
        self.tasks: dict[str, Callable[..., None]] = {}

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            self.tasks[what] = self.bars.bar(f"scoring {what}", total)
        self.tasks[what](completed=done)


def run_table(info: RunInfo) -> Table:
    """First, last, min and max of the metrics a training run logged."""
    t = Table(title=f"training run {info.path} — {len(info.metrics)} logged rows")
    for col in ("metric", "first", "last", "min", "max"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    keys = ["loss", "rewards/accuracies", "rewards/margins", "margin/mean", "margin/std", "margin/min", "margin/max",
            "normalizer/mu", "normalizer/sigma"]
    for k in keys:
        xs, ys = info.series(k)
        if ys:
            t.add_row(k, _fmt(ys[0]), _fmt(ys[-1]), _fmt(min(ys)), _fmt(max(ys)))
    return t


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_style="bold")


def _quantity_table(report: MarginReport) -> Table:
    s = report.primary
    t = _table(f"per-pair quantities — {s.label} ({len(report.pairs)} pairs)")
    stats = ["mean", "std", "min", "q05", "q50", "q95", "max"]
    t.add_column("quantity", no_wrap=True)
    for c in stats:
        t.add_column({"q05": "5%", "q50": "median", "q95": "95%"}.get(c, c), justify="right", no_wrap=True)
    rows = [
        ("Δθ", s.delta_theta), ("Δref", s.delta_ref), ("g = Δθ−Δref", s.g), ("z", s.z),
        ("margin m", s.margin), ("r_w − r_l", s.reward_diff), ("loss", s.loss), ("|y_w|−|y_l|", s.length_diff),
    ]
    for name, values in rows:
        if values is None:
            continue
        d = describe(values)
        t.add_row(name, *[_fmt(d[c], 3) for c in stats])
    return t


def _series_table(report: MarginReport) -> Table:
    t = _table("by series: margin m, its correlations, implicit-reward accuracy, loss")
    for col in ("series", "α", "γ/β", "m mean", "m std", "r(m,Δlen)", "r(m,Δref)", "acc", "loss"):
        t.add_column(col, justify="left" if col == "series" else "right", no_wrap=col != "series")
    for s in report.series:
        t.add_row(
            s.label, _fmt(s.alpha), _fmt(s.gamma_beta_ratio),
            _fmt(float(s.margin.mean()), 3), _fmt(float(s.margin.std(ddof=1)) if s.margin.size > 1 else 0.0, 3),
            _fmt(correlation(s.margin, s.length_diff), 3), _fmt(correlation(s.margin, s.delta_ref), 3),
            _fmt(float(s.correct.mean()), 3), _fmt(float(s.loss.mean()), 4),
        )
    return t


def _extremes_table(report: MarginReport, positions: list[int], title: str, width: int) -> Table:
    s = report.primary
    t = _table(title)
    t.show_lines = True
    t.add_column("row", justify="right", no_wrap=True)
    t.add_column("margin", no_wrap=True)
    t.add_column("scores", no_wrap=True)
    t.add_column("pair (prompt / + chosen / − rejected)", no_wrap=True)
    for i in positions:
        p = report.pairs[i]
        z = "–" if s.z is None else _fmt(float(s.z[i]), 3)
        dref = "–" if s.delta_ref is None else _fmt(float(s.delta_ref[i]), 3)
        t.add_row(
            str(p["row"]),
            f"m {_fmt(float(s.margin[i]), 4)}\nz {z}\nΔlen {int(s.length_diff[i])}",
            f"Δref {dref}\nr_w−r_l {_fmt(float(s.reward_diff[i]), 3)}\n{'ranked ✓' if s.correct[i] else 'ranked ✗'}",
            f"{_clip(p['prompt'], width)}\n+ {_clip(p['chosen'], width - 2)}\n− {_clip(p['rejected'], width - 2)}",
        )
    return t


def print_report(out: Console, report: MarginReport, top_k: int = 5, bins: int | None = None) -> None:
    """The report on `out`: data and reference, method and normalisation, the per-pair quantities of the
    primary series, one row per series, a histogram of its margin (of the reward difference when the
    margin is constant; `bins` default 2·√pairs, 5 to 30) and its `top_k` largest and smallest pairs."""
    s = report.primary
    out.print(f"[bold]{len(report.pairs)} pairs[/] from {escape(report.dataset)} \\[{escape(report.split)}]; "
              f"reference log-probs: {escape(report.reference)}", soft_wrap=True, highlight=False)
    params = ", ".join(f"{k}={v}" for k, v in (vars(s.params).items() if hasattr(s.params, "__dict__") else []))
    out.print(f"method {s.method} ({params})", soft_wrap=True, highlight=False)
    seen = set()
    for x in report.series:
        if x.policy not in seen:
            seen.add(x.policy)
            out.print(f"normalisation ({x.policy}): {norm_description(x, report.norm_batch)}", soft_wrap=True,
                      highlight=False)
    for note in report.notes:
        out.print(f"[dim]note: {note}[/]", soft_wrap=True)
    out.print(_quantity_table(report))
    out.print(_series_table(report))
    if float(s.margin.max() - s.margin.min()) > 1e-12:
        values, what = s.margin, "margin m"
    else:
        values, what = s.reward_diff, "reward difference (the margin is constant)"
    if bins is None:
        bins = min(30, max(5, round(2 * math.sqrt(len(report.pairs)))))
    out.print(render_histogram(values, bins=bins, title=f"{what} — {s.label}"))
    if top_k:
        top, bottom = report.extremes(top_k)
        width = max(24, min(100, out.width - 40))
        out.print(_extremes_table(report, top, f"top {len(top)} pairs by margin — {s.label}", width))
        out.print(_extremes_table(report, bottom, f"bottom {len(bottom)} pairs by margin — {s.label}", width))


_PARTIAL = " ▏▎▍▌▋▊▉"


def render_histogram(values: np.ndarray, *, bins: int = 20, width: int = 40, title: str = "") -> Table:
    """A rich table: one row per bin, a bar of unicode blocks proportional to its count."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    table = Table(title=title, show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("from", justify="right")
    table.add_column("to", justify="right")
    table.add_column("", justify="left", no_wrap=True)
    table.add_column("pairs", justify="right")
    if v.size == 0:
        table.add_row("-", "-", Text("no finite values"), "0")
        return table
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        counts, edges = np.array([v.size]), np.array([lo, hi])
    else:
        counts, edges = np.histogram(v, bins=max(1, int(bins)), range=(lo, hi))
    peak = max(1, int(counts.max()))
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        cells = c / peak * width
        full = int(cells)
        part = int(round((cells - full) * 8))
        if part == 8:
            full, part = full + 1, 0
        bar = "█" * full + (_PARTIAL[part] if part else "")
        table.add_row(f"{a:.4g}", f"{b:.4g}", Text(bar, style="cyan"), str(int(c)))
    return table
