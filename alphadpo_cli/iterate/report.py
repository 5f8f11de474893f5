"""What an experiment shows: the rounds table (one row per round, π_0 first and the offline round
last), `rounds.json` (everything, rewritten atomically after each phase) and `rounds.png` (reward
± SE and win rate against π_0, by round; the offline round as dashed lines)."""

from __future__ import annotations

from pathlib import Path

from .. import results as shared
from ..io import atomic_path, atomic_write_json

COLUMNS = ("round", "pairs", "gap", "loss", "acc", "reward±SE", "win π0", "win prev", "tokens", "s")


def _num(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _pm(mean, se) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" + (f"±{se:.2f}" if se is not None else "")


def table_row(row: dict) -> list[str]:
    """One row of the table from a `rounds.json` round (its phases' summaries)."""
    s, t, j = row.get("sample") or {}, row.get("train") or {}, row.get("judge") or {}
    seconds = sum(v for v in (row.get("seconds") or {}).values() if v)
    return [str(row["round"]), _num(s.get("pairs"), "d"), _num(s.get("score_gap")), _num(t.get("loss")),
            _num(t.get("accuracy"), ".2f"), _pm(j.get("reward"), j.get("reward_se")),
            _num(j.get("win_vs_initial"), ".2f"), _num(j.get("win_vs_previous"), ".2f"),
            _num(j.get("length_tokens"), ".1f"),
            _num(seconds or None, ".0f")]


def all_rows(record: dict) -> list[dict]:
    rows = [{"round": "π0", "judge": record.get("initial")}] + list(record.get("rounds") or [])
    if record.get("offline"):
        rows.append(record["offline"])
    return rows


def rounds_table(record: dict, title: str = "online α-DPO, by round"):
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True, caption="pairs kept, mean score gap, last logged training loss and "
                  "accuracy; held-out reward, win rates (ties 1/2, SE in rounds.json), mean answer tokens; seconds",
                  caption_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "round" else "right", no_wrap=True)
    for row in all_rows(record):
        table.add_row(*table_row(row))
    return table


def judge_metrics(judge: dict) -> dict:
    """A judged model's numbers in the shared results format: one model, so every spread is over the
    held-out prompts (reward, win rates; the reward's extras and the length as means)."""
    n = judge.get("n")
    est = lambda mean, se=None: shared.estimate(mean, se, n, unit="prompts")  # noqa: E731
    metrics = {"mean_reward": est(judge.get("reward"), judge.get("reward_se")),
               "win_rate": est(judge.get("win_vs_initial"), judge.get("win_vs_initial_se")),
               "win_vs_previous": est(judge.get("win_vs_previous"), judge.get("win_vs_previous_se")),
               "length_tokens": est(judge.get("length_tokens"))}
    metrics.update({k: est(v) for k, v in (judge.get("extras") or {}).items() if k not in metrics})
    return metrics


def results_section(record: dict) -> dict:
    """rounds.json's `results` (the format compare.json shares, `alphadpo_cli.results`): π0 as the base,
    each judged round, the offline round; win rates against π0."""
    rows = []
    if record.get("initial"):
        rows.append(shared.row("π0", "base", judge_metrics(record["initial"]), model=record.get("initial_model")))
    for r in record.get("rounds") or []:
        if r.get("judge"):
            rows.append(shared.row(f"round {r['round']}", "round", judge_metrics(r["judge"]), model=r.get("model")))
    offline = record.get("offline") or {}
    if offline.get("judge"):
        rows.append(shared.row("offline", "offline", judge_metrics(offline["judge"]), model=offline.get("model"),
                               setting="same budget from π0"))
    return shared.section(rows, baseline="π0")


def write_rounds_json(path: Path, record: dict) -> None:
    atomic_write_json(path, {**record, "results": results_section(record)})


def plot_rounds(record: dict, path: Path) -> Path | None:
    """Reward ± SE and win rate vs π_0 against round (round 0 = π_0); None before any round is judged."""
    rounds = [r for r in record.get("rounds") or [] if (r.get("judge") or {}).get("reward") is not None]
    initial = record.get("initial") or {}
    if not rounds or initial.get("reward") is None:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    xs = [0] + [r["round"] for r in rounds]
    judged = [initial] + [r["judge"] for r in rounds]
    fig, (ax_r, ax_w) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_r.errorbar(xs, [j["reward"] for j in judged], yerr=[j.get("reward_se") or 0 for j in judged], marker="o",
                  capsize=3, label="online")
    ax_w.plot(xs, [0.5] + [j.get("win_vs_initial") for j in judged[1:]], marker="o", label="vs π0")
    ax_w.plot(xs[1:], [j.get("win_vs_previous") for j in judged[1:]], marker="s", label="vs previous round")
    offline = (record.get("offline") or {}).get("judge") or {}
    if offline.get("reward") is not None:
        ax_r.axhline(offline["reward"], linestyle="--", color="gray", label="offline, same budget")
        ax_w.axhline(offline.get("win_vs_initial") or 0.5, linestyle="--", color="gray", label="offline vs π0")
    for ax, name in ((ax_r, "held-out reward (mean ± SE)"), (ax_w, "win rate")):
        ax.set_xlabel("round")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(xs)
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
