"""The comparison's plots (matplotlib, Agg): methods × metric with 95% intervals over seeds, and a
grid's validation accuracy against the swept value."""

from __future__ import annotations

from pathlib import Path

PLOTTED = {"accuracy": "preference accuracy (test)", "mean_reward": "reward (test)",
           "win_rate": "win rate vs base (test)", "constraints_satisfied": "constraints satisfied (test)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _errors(ivs: list[dict]) -> list[list[float]]:
    """Asymmetric error bars from the 95% intervals (0 where there is none: one seed)."""
    lo = [iv["mean"] - iv["ci95"][0] if iv.get("ci95") else 0.0 for iv in ivs]
    hi = [iv["ci95"][1] - iv["mean"] if iv.get("ci95") else 0.0 for iv in ivs]
    return [lo, hi]


def plot_methods(result: dict, path: Path) -> Path | None:
    """One panel per metric: each method's mean with its 95% interval, the base model dashed."""
    methods = result["methods"]
    keys = [k for k in PLOTTED if all((m["metrics"].get(k) or {}).get("mean") is not None for m in methods)]
    if not keys or not methods:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 0.5, 3.4), squeeze=False)
    names = [m["method"] + (f"\n{m['setting']}" if result["grid"] else "") for m in methods]
    for ax, key in zip(axes[0], keys):
        ivs = [m["metrics"][key] for m in methods]
        ax.errorbar(range(len(ivs)), [iv["mean"] for iv in ivs], yerr=_errors(ivs), fmt="o", capsize=4)
        base = (result.get("base") or {}).get(key)
        if base is not None and key != "win_rate":
            ax.axhline(base, linestyle="--", color="gray", label="base model")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(ivs)), names, fontsize=7)
        ax.set_xlim(-0.5, len(ivs) - 0.5)
        ax.set_title(PLOTTED[key], fontsize=9)
    fig.suptitle(f"mean and 95% t-interval over {len(result['seeds'])} seed(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _xs(rows: list[dict]) -> tuple[list, bool]:
    """The swept value when one key is swept (numbers), else the grid points' order."""
    keys = {k for r in rows for k in r["point"]}
    if len(keys) == 1:
        (key,) = keys
        vals = [r["point"][key] for r in rows]
        if all(isinstance(v, (int, float)) for v in vals):
            return vals, True
    return list(range(len(rows))), False


def plot_grid(result: dict, path: Path) -> Path | None:
    """Validation accuracy (mean, 95% interval over seeds) against the swept value, one line per
    method with more than one grid point; the chosen point ringed."""
    swept = [m for m in result["methods"] if m.get("grid") and len(m["grid"]) > 1]
    if not swept:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = None
    for m in swept:
        rows = [r for r in m["grid"] if r["accuracy"]]
        xs, numeric = _xs(rows)
        ivs = [r["accuracy"] for r in rows]
        ax.errorbar(xs, [iv["mean"] for iv in ivs], yerr=_errors(ivs), marker="o", capsize=3, label=m["method"])
        best = [x for x, r in zip(xs, rows) if r["point"] == m["point"]]
        ax.scatter(best, [iv["mean"] for iv, r in zip(ivs, rows) if r["point"] == m["point"]], s=160,
                   facecolors="none", edgecolors="black")
        if not numeric:
            labels = [r["name"] for r in rows]
    if labels:
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    else:
        keys = sorted({k.rsplit(".", 1)[-1] for m in swept for r in m["grid"] for k in r["point"]})
        ax.set_xlabel(", ".join(keys))
        xs_all = [x for m in swept for x in _xs(m["grid"])[0]]
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
            ax.set_xscale("log")
    ax.set_ylabel("preference accuracy (validation)")
    ax.set_title("the grid on the validation pairs (ringed: chosen)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
