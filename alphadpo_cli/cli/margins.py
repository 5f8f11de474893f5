"""`alphadpo margins`: the command-line face of :mod:`alphadpo_cli.margins`.

Parses the options into an :class:`~alphadpo_cli.margins.options.InspectOptions`, calls the API
and prints with :mod:`alphadpo_cli.margins.terminal`. Only the light options module is imported
here (the --norm choices), so that `alphadpo --help` does not import torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..config import ConfigError
from ..margins.options import NORM_MODES, InspectOptions, PolicySpec, parse_labelled
from .common import console as err_console
from .common import friendly, results


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


#: The options of `alphadpo margins`, top to bottom as `--help` lists them.
_OPTIONS = [
    click.option("--model", help="Base model, also the reference (hub id, dir, .gguf, pkg:<pkg>/<file.gguf>, "
                 "tiny-random). Read from the run's config.yaml when omitted."),
    click.option("--adapter", "adapters", multiple=True, metavar="[LABEL=]DIR",
                 help="LoRA adapter or training output dir. Repeat to compare runs: one curve per run."),
    click.option("--policy", "policies", multiple=True, metavar="[LABEL=]PATH",
                 help="A fully fine-tuned policy (dir or hub id), repeatable; --model is its reference."),
    click.option("--data", help="Preference pairs to score: .jsonl/.json/.parquet, a directory or a hub id."),
    click.option("--split", help="Split to inspect (default: the config's eval split, else its train split)."),
    click.option("--max-samples", type=int, help="Only the first N pairs (default: the config's limit for the split)."),
    click.option("--preset", "-p", help="Preset giving method, params and tokenisation (default: the run's config)."),
    click.option("--loss", help="Inspect under another method of the loss registry (e.g. simpo)."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override any config key, e.g. loss.params.beta=10."),
    click.option("--alpha", "alphas", metavar="LIST", help="Comma-separated α values, one series each, e.g. 0,0.05,0.1,0.2."),
    click.option("--gamma", "gammas", metavar="LIST",
                 help="Comma-separated γ/β (gamma_beta_ratio) values, one series each (SimPO's curves)."),
    click.option("--norm", type=click.Choice(NORM_MODES), default="auto", show_default=True,
                 help="How g is z-scored: over the whole split (dataset), per group (batch), the training "
                     "EMA replayed (ema, official), the run's last μ, σ (run), or not (none)."),
    click.option("--norm-batch", type=int, help="Pairs per group for --norm batch/ema/official "
                 "(default: the training per-device batch)."),
    click.option("--batch-size", type=int, help="Scoring batch size (default: the config's eval batch size)."),
    click.option("--from-run", "run_dir", type=click.Path(file_okay=False),
                 help="A training output dir: plot its margin and normaliser curves; with --data also score its policy."),
    click.option("--output-dir", "-o", help="Where pairs, summary.json and plots go (default: RUN/margins with "
                 "--from-run, else ./margins)."),
    click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
                 help="Per-pair file format."),
    click.option("--top-k", type=int, default=5, show_default=True, help="Pairs shown with the largest and smallest margins."),
    click.option("--bins", type=int, help="Bins of the terminal histogram (default: 2·√pairs, 5 to 30)."),
    click.option("--no-plots", is_flag=True, help="Skip the PNG plots."),
    click.option("--no-cache", is_flag=True, help="Recompute reference log-probs even when training cached them."),
    click.option("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)."),
]


def _with_options(f):
    for option in reversed(_OPTIONS):  # as stacked decorators apply: the last one first
        f = option(f)
    return f


def register(main: click.Group) -> None:
    @main.command("margins")
    @_with_options
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
        alpha_values, gamma_values = _floats("--alpha", alphas), _floats("--gamma", gammas)
        _check_args(data, run_dir, adapters, policies, top_k, bins)
        request = None
        if data:
            specs = [PolicySpec(path, kind, label) for kind, values in (("adapter", adapters), ("full", policies))
                     for label, path in map(parse_labelled, values)]
            request = InspectOptions(
                data, model=model, policies=specs, run_dir=run_dir, preset=preset, loss=loss, overrides=overrides,
                split=split, max_samples=max_samples, alphas=alpha_values,
                gammas=gamma_values, norm=norm, norm_batch=norm_batch, batch_size=batch_size,
                device=device, use_reference_cache=not no_cache)
        out = results
        out_dir = Path(output_dir) if output_dir else (Path(run_dir) / "margins" if run_dir else Path("margins"))
        written: list[Path] = []
        if run_dir:
            written += _show_run(out, err_console, run_dir, out_dir, plots=not no_plots)
        if request is not None:
            written += _inspect(out, err_console, request, out_dir, fmt=fmt, top_k=top_k, bins=bins,
                                plots=not no_plots)
        if written:
            out.print("[bold]written:[/] " + ", ".join(str(p) for p in written), soft_wrap=True)


def _check_args(data, run_dir, adapters, policies, top_k: int, bins: int | None) -> None:
    """The combinations of options `alphadpo margins` refuses, each with what to do instead."""
    if not data and not run_dir:
        raise ConfigError("give --data (the pairs to score) with a policy, or --from-run DIR (or both)")
    if top_k < 0 or (bins is not None and bins < 1):
        raise ConfigError("--top-k must be >= 0 and --bins >= 1")
    if run_dir and (adapters or policies):
        raise ConfigError("--from-run scores the run's own policy: drop --adapter/--policy, or drop --from-run")


def _show_run(out, err_console, run_dir: str, out_dir: Path, *, plots: bool) -> list[Path]:
    """A training run's logged metrics as a table, and its margin and normaliser curves as a PNG."""
    from ..margins import load_run, plot_run
    from ..margins.terminal import run_table

    run = load_run(run_dir)
    out.print(run_table(run))
    if not plots:
        return []
    if any(run.series(k)[0] for k in ("margin/mean", "normalizer/mu", "normalizer/sigma")):
        return [plot_run(run, out_dir / "margins-run.png")]
    err_console.print(f"[yellow]{run.path}: no margin/normaliser metrics logged; no training-curve plot[/]")
    return []


def _inspect(out, err_console, request: InspectOptions, out_dir: Path, *, fmt: str, top_k: int, bins: int | None,
             plots: bool) -> list[Path]:
    """Score the pairs, print the report, write pairs.<fmt>, summary.json and (`plots`) the PNGs."""
    from ..margins import inspect_margins, plot_distributions
    from ..margins.terminal import ScoringProgress, print_report

    with ScoringProgress(err_console) as progress:
        report = inspect_margins(request, progress=progress, log=err_console.print)
    print_report(out, report, top_k, bins)
    written = [report.write_pairs(out_dir / f"pairs.{fmt}"), report.write_summary(out_dir / "summary.json")]
    if plots:
        written += list(plot_distributions(report, out_dir).values())
    return written
