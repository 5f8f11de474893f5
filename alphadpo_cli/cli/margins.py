"""`alphadpo margins`: the command-line face of :mod:`alphadpo_cli.margins`."""

from __future__ import annotations

import math
from pathlib import Path

import click

# Kept here (not imported from .margins) so that `alphadpo --help` does not import torch;
# tests check it equals alphadpo_cli.margins.NORM_MODES.
NORM_MODES = ("auto", "dataset", "batch", "ema", "official", "none", "run")


def _floats(option: str, text: str | None) -> list[float] | None:
    if not text:
        return None
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise click.BadParameter(f"'{part}' is not a number (expected e.g. 0,0.05,0.1)", param_hint=option) from None
        if not math.isfinite(v):
            raise click.BadParameter(f"'{part}' is not finite", param_hint=option)
        values.append(v)
    return values or None


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


class _Progress:
    """One rich progress bar per scoring pass, on stderr; silent when stderr is not a terminal."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True, disable=not console.is_terminal,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            self.tasks[what] = self.progress.add_task(f"scoring {what}", total=total)
        self.progress.update(self.tasks[what], completed=done)


def _run_table(info):
    from rich.table import Table

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


def _table(title: str):
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_style="bold")


def _quantity_table(report):
    from ..margins import describe

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


def _series_table(report):
    from ..margins import correlation

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


def _extremes_table(report, positions, title, width):
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


def register(main: click.Group) -> None:
    from . import console as err_console
    from . import friendly

    @main.command("margins")
    @click.option("--model", help="Base model, also the reference (hub id, dir, .gguf, pkg:<pkg>/<file.gguf>, "
                  "tiny-random). Read from the run's config.yaml when omitted.")
    @click.option("--adapter", "adapters", multiple=True, metavar="[LABEL=]DIR",
                  help="LoRA adapter or training output dir. Repeat to compare runs: one curve per run.")
    @click.option("--policy", "policies", multiple=True, metavar="[LABEL=]PATH",
                  help="A fully fine-tuned policy (dir or hub id), repeatable; --model is its reference.")
    @click.option("--data", help="Preference pairs to score: .jsonl/.json/.parquet, a directory or a hub id.")
    @click.option("--split", help="Split to inspect (default: the config's eval split, else its train split).")
    @click.option("--max-samples", type=int, help="Only the first N pairs (default: the config's limit for the split).")
    @click.option("--preset", "-p", help="Preset giving method, params and tokenisation (default: the run's config).")
    @click.option("--loss", help="Inspect under another method of the loss registry (e.g. simpo).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override any config key, e.g. loss.params.beta=10.")
    @click.option("--alpha", "alphas", metavar="LIST", help="Comma-separated α values, one series each, e.g. 0,0.05,0.1,0.2.")
    @click.option("--gamma", "gammas", metavar="LIST",
                  help="Comma-separated γ/β (gamma_beta_ratio) values, one series each (SimPO's curves).")
    @click.option("--norm", type=click.Choice(NORM_MODES), default="auto", show_default=True,
                  help="How g is z-scored: over the whole split (dataset), per group (batch), the training "
                       "EMA replayed (ema, official), the run's last μ, σ (run), or not (none).")
    @click.option("--norm-batch", type=int, help="Pairs per group for --norm batch/ema/official "
                  "(default: the training per-device batch).")
    @click.option("--batch-size", type=int, help="Scoring batch size (default: the config's eval batch size).")
    @click.option("--from-run", "run_dir", type=click.Path(file_okay=False),
                  help="A training output dir: plot its margin and normaliser curves; with --data also score its policy.")
    @click.option("--output-dir", "-o", help="Where pairs, summary.json and plots go (default: RUN/margins with "
                  "--from-run, else ./margins).")
    @click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
                  help="Per-pair file format.")
    @click.option("--top-k", type=int, default=5, show_default=True, help="Pairs shown with the largest and smallest margins.")
    @click.option("--bins", type=int, help="Bins of the terminal histogram (default: 2·√pairs, 5 to 30).")
    @click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
    @click.option("--no-cache", is_flag=True, help="Recompute reference log-probs even when training cached them.")
    @click.option("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one).")
    @friendly
    def margins(model, adapters, policies, data, split, max_samples, preset, loss, overrides, alphas, gammas, norm,
                norm_batch, batch_size, run_dir, output_dir, fmt, top_k, bins, no_plots, no_cache, device):
        """α-DPO's adaptive margin, pair by pair: g, z, m = γ/β + α·z, rewards, and the paper's plots.

        \b
        Examples:
          alphadpo margins --from-run outputs/tiny
          alphadpo margins --from-run outputs/tiny --data examples/demo --alpha 0,0.05,0.1,0.2
          alphadpo margins --model tiny-random --adapter a0=runs/a0 --adapter a0.2=runs/a02 --data prefs/
        """
        from rich.console import Console

        from ..config import ConfigError
        from ..margins import PolicySpec, inspect_margins, load_run, parse_labelled, plot_distributions, plot_run

        out = Console()
        alpha_values, gamma_values = _floats("--alpha", alphas), _floats("--gamma", gammas)
        if not data and not run_dir:
            raise ConfigError("give --data (the pairs to score) with a policy, or --from-run DIR (or both)")
        if top_k < 0 or (bins is not None and bins < 1):
            raise ConfigError("--top-k must be >= 0 and --bins >= 1")
        if run_dir and (adapters or policies):
            raise ConfigError("--from-run scores the run's own policy: drop --adapter/--policy, or drop --from-run")
        out_dir = Path(output_dir) if output_dir else (Path(run_dir) / "margins" if run_dir else Path("margins"))
        written: list[Path] = []

        run = None
        if run_dir:
            run = load_run(run_dir)
            out.print(_run_table(run))
            if not no_plots:
                if any(run.series(k)[0] for k in ("margin/mean", "normalizer/mu", "normalizer/sigma")):
                    written.append(plot_run(run, out_dir / "margins-run.png"))
                else:
                    err_console.print(f"[yellow]{run.path}: no margin/normaliser metrics logged; no training-curve plot[/]")

        if data:
            specs = []
            for kind, values in (("adapter", adapters), ("full", policies)):
                for v in values:
                    label, path = parse_labelled(v)
                    specs.append(PolicySpec(path, kind, label))
            with _Progress(err_console) as prog:
                report = inspect_margins(
                    data, model=model, policies=specs, run_dir=run_dir, preset=preset, loss=loss,
                    overrides=overrides, split=split, max_samples=max_samples, alphas=alpha_values,
                    gammas=gamma_values, norm=norm, norm_batch=norm_batch, batch_size=batch_size, device=device,
                    use_reference_cache=not no_cache, progress=prog, log=lambda m: err_console.print(m),
                )
            _print_report(out, report, top_k, bins)
            written.append(report.write_pairs(out_dir / f"pairs.{fmt}"))
            written.append(report.write_summary(out_dir / "summary.json"))
            if not no_plots:
                written += list(plot_distributions(report, out_dir).values())
        if written:
            out.print("[bold]written:[/] " + ", ".join(str(p) for p in written), soft_wrap=True)


def _print_report(out, report, top_k: int, bins: int | None) -> None:
    from ..margins import norm_description, render_histogram

    s = report.primary
    from rich.markup import escape

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
