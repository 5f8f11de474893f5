"""The paper's figures as PNGs: the reward-difference, chosen log-likelihood and margin densities of a
:class:`~alphadpo_cli.margins.report.MarginReport`, and a training run's margin and normaliser
curves. Each PNG records the series it draws in a text chunk (:func:`read_png_series`).
matplotlib is imported on first use (Agg backend).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..io import atomic_path
from .report import MarginReport, RunInfo, load_run

PNG_SERIES_KEY = "alphadpo:series"


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian kernel density (``scipy.stats.gaussian_kde``) on ``grid``, with Silverman's robust rule
    of thumb for the bandwidth, h = 0.9·min(std, IQR/1.349)·n^(−1/5) (Silverman 1986, eq. 3.31; scipy's
    own "silverman" uses the std alone, which oversmooths skewed margins); None when the values are
    (nearly) constant."""
    from scipy.stats import gaussian_kde

    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return None
    std = float(x.std(ddof=1))
    iqr = float(np.subtract(*np.percentile(x, [75, 25])))
    spread = min(std, iqr / 1.349) if iqr > 0 else std
    scale = max(1.0, float(np.abs(x).max()))
    if spread <= 1e-9 * scale:
        return None
    bandwidth = 0.9 * spread * x.size ** (-0.2)
    try:  # a scalar bw_method is the factor scipy multiplies the data's (N−1) std by
        return gaussian_kde(x, bw_method=bandwidth / std)(grid)
    except np.linalg.LinAlgError:  # a spread too small for scipy's covariance: draw it as a constant
        return None


def _grid(arrays: list[np.ndarray]) -> np.ndarray:
    allv = np.concatenate([np.asarray(a, dtype=np.float64)[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(1)
    if allv.size == 0:
        allv = np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    pad = (hi - lo) * 0.15 or max(abs(lo), 1.0) * 0.05
    return np.linspace(lo - pad, hi + pad, 512)


def _colors(n: int):
    plt = _mpl()
    cmap = plt.get_cmap("viridis")
    return [cmap(0.1 + 0.75 * i / max(1, n - 1)) for i in range(n)]


def _style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.grid(alpha=0.3, linestyle=":")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _density_plot(ax, named: list[tuple[str, np.ndarray]], colors, *, dashed: set[str] = frozenset()) -> list[str]:
    grid = _grid([v for _, v in named])
    drawn = []
    for (label, values), color in zip(named, colors):
        dens = _kde(values, grid)
        style = "--" if label in dashed else "-"
        if dens is None:  # a constant (e.g. SimPO's margin): a spike
            finite = np.asarray(values, dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            ax.axvline(float(finite.mean()) if finite.size else 0.0, color=color, linestyle=style, lw=2,
                       label=f"{label} (constant)")
        else:
            ax.plot(grid, dens, color=color, lw=2, linestyle=style, label=label)
            if label not in dashed:
                ax.fill_between(grid, dens, color=color, alpha=0.18)
        drawn.append(label)
    ax.legend(frameon=False, fontsize=9)
    return drawn


def _save(fig, path: Path, series: list[str], title: str) -> Path:
    plt = _mpl()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight",
                    metadata={"Title": title, "Software": "alphadpo margins", PNG_SERIES_KEY: json.dumps(series)})
    plt.close(fig)
    return path


def read_png_series(path: str | Path) -> list[str]:
    """The series labels a plot written here records in its PNG text chunk."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return json.loads(im.text.get(PNG_SERIES_KEY, "[]"))


def plot_distributions(report: MarginReport, out_dir: str | Path, prefix: str = "margins") -> dict[str, Path]:
    """Figures 4(b,c) / 6 of the paper, one PNG each, plus the margin's own distribution:

    * ``<prefix>-reward.png`` — density of the reward difference r(x,y_w) − r(x,y_l), one curve per series
      (per α, per γ/β, or per policy);
    * ``<prefix>-loglik.png`` — density of the chosen response's mean log-likelihood
      log πθ(y_w|x)/|y_w|, one curve per policy (it does not depend on α) and the reference, dashed;
    * ``<prefix>-margin.png`` — density of the adaptive margin m = γ/β + α·z, one curve per series.
    """
    plt = _mpl()
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    colors = _colors(len(report.series))
    data_note = f"{report.dataset} [{report.split}], {len(report.pairs)} pairs"

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    labels = _density_plot(ax, [(s.label, s.reward_diff) for s in report.series], colors)
    ax.axvline(0.0, color="grey", lw=0.8, alpha=0.6)
    _style(ax, "Reward difference distribution", "r(x, y_w) − r(x, y_l)")
    fig.text(0.01, -0.02, data_note, fontsize=7, color="grey")
    written["reward"] = _save(fig, out_dir / f"{prefix}-reward.png", labels, "reward difference distribution")

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    named = [(p.label, (p.scores.policy_chosen_logps / p.scores.chosen_lengths).double().numpy()) for p in report.policies]
    dashed = set()
    ref_scores = report.policies[0].scores
    if ref_scores.ref_chosen_logps is not None:
        named.append(("reference", (ref_scores.ref_chosen_logps / ref_scores.chosen_lengths).double().numpy()))
        dashed.add("reference")
    pol_colors = _colors(len(report.policies)) + ["0.35"]
    labels = _density_plot(ax, named, pol_colors, dashed=dashed)
    _style(ax, "Log-likelihood of chosen responses", "log πθ(y_w | x) / |y_w|")
    fig.text(0.01, -0.02, data_note, fontsize=7, color="grey")
    written["loglik"] = _save(fig, out_dir / f"{prefix}-loglik.png", labels, "chosen log-likelihood distribution")

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    labels = _density_plot(ax, [(s.label, s.margin) for s in report.series], colors)
    _style(ax, "Adaptive margin m = γ/β + α·z", "margin m (ratio units)")
    fig.text(0.01, -0.02, data_note + f", normalisation: {report.primary.norm}", fontsize=7, color="grey")
    written["margin"] = _save(fig, out_dir / f"{prefix}-margin.png", labels, "margin distribution")
    return written


RUN_MARGIN_KEYS = ("margin/mean", "margin/std", "margin/min", "margin/max")
RUN_NORM_KEYS = ("normalizer/mu", "normalizer/sigma")


def plot_run(run: RunInfo | str | Path, path: str | Path) -> Path:
    """Training curves of the margin statistics and of the normaliser's μ and σ (metrics.jsonl)."""
    plt = _mpl()
    info = run if isinstance(run, RunInfo) else load_run(run)
    available = [k for k in RUN_MARGIN_KEYS + RUN_NORM_KEYS if info.series(k)[0]]
    if not available:
        raise ConfigError(
            f"{info.path / 'metrics.jsonl'} has no margin or normaliser statistics to plot "
            "(was the run an α-DPO method, and did it log at least one step?)"
        )
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    drawn: list[str] = []
    ax = axes[0]
    xs, mean = info.series("margin/mean")
    if xs:
        ax.plot(xs, mean, color="C0", lw=2, marker="o" if len(xs) < 30 else None, ms=3, label="mean")
        drawn.append("margin/mean")
        sx, std = info.series("margin/std")
        if sx and len(sx) == len(xs):
            m, s = np.asarray(mean), np.asarray(std)
            ax.fill_between(xs, m - s, m + s, color="C0", alpha=0.2, label="± std")
            drawn.append("margin/std")
    for key, style in (("margin/min", ":"), ("margin/max", "--")):
        kx, kv = info.series(key)
        if kx:
            ax.plot(kx, kv, color="C0", lw=1, linestyle=style, label=key.split("/")[1],
                    marker="." if len(kx) < 30 else None, ms=4)
            drawn.append(key)
    ax.set_title("adaptive margin m (per logged step)", fontsize=11)
    for a, key, color, title in ((axes[1], "normalizer/mu", "C1", "normaliser μ"),
                                 (axes[2], "normalizer/sigma", "C2", "normaliser σ")):
        kx, kv = info.series(key)
        if kx:
            a.plot(kx, kv, color=color, lw=2, marker="o" if len(kx) < 30 else None, ms=3, label=key.split("/")[1])
            drawn.append(key)
            if key.endswith("sigma") and min(kv) > 0 and max(kv) / min(kv) > 50:
                a.set_yscale("log")
        a.set_title(title, fontsize=11)
    for a in axes:
        a.set_xlabel("optimiser step")
        a.grid(alpha=0.3, linestyle=":")
        for side in ("top", "right"):
            a.spines[side].set_visible(False)
        if a.get_legend_handles_labels()[0]:
            a.legend(frameon=False, fontsize=8)
    fig.suptitle(f"training run {info.path.name}", fontsize=11)
    fig.tight_layout()
    return _save(fig, Path(path), drawn, "training margin statistics")
