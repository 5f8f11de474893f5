"""The paper's Table 1 in miniature: α-DPO, SimPO and DPO trained on the demo data with the same
budget (the same preset, data, steps and seed; only the loss differs, with the preset's tuned
settings for each), then one table: held-out preference accuracy, the share of constraints the
greedy answers satisfy, the win rate against the base model's answers, mean reward, length.

    python examples/compare.py                       # = make compare; ~20 min on 2 CPU cores
    python examples/compare.py --reuse               # keep finished runs, evaluate again
    python examples/compare.py --preset tiny --losses alpha_dpo,dpo --max-new-tokens 8   # a smoke run

Each run is `alphadpo train --preset P --loss L -o OUT/L --overwrite`, exactly as typed at a
shell; the evaluation is `alphadpo eval reward` (its API) with the verifiable reward, the base
model's answers generated once and shared by every run. Everything lands in OUT (default
outputs/compare): the runs, OUT/eval/<name>/, and OUT/compare.json with the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REWARD = f"{HERE / 'verifiable_reward.py'}:reward"
LOSSES = ("alpha_dpo", "simpo", "dpo")
NAMES = {"alpha_dpo": "α-DPO", "simpo": "SimPO", "dpo": "DPO", "base": "base model"}
COLUMNS = ["method", "pref. acc. (avg log-p)", "pref. acc. (log-ratio)", "constraints satisfied",
           "all satisfied", "win rate vs base", "mean reward ± SE", "length (tokens / words)", "training steps"]


def train_run(preset: str, loss: str, run_dir: Path, reuse: bool) -> tuple[dict, float | None]:
    """(train_results.json of the run, seconds spent training now or None when reused)."""
    results = run_dir / "train_results.json"
    if reuse and results.is_file():
        print(f"reusing {run_dir} (--reuse)", flush=True)
        return json.loads(results.read_text()), None
    cmd = [sys.executable, "-m", "alphadpo_cli.cli", "train", "--preset", preset, "--loss", loss,
           "-o", str(run_dir), "--overwrite"]
    print("$ alphadpo " + " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads(results.read_text()), time.perf_counter() - start


def _row(method: str, train: dict | None, evaluation: dict, which: str = "eval_after") -> dict:
    """One line of the table: the run's held-out report (train_results.json) and its `eval reward`."""
    stats = evaluation["model_stats"]
    report = (train or {}).get(which) or {}
    win = evaluation.get("win") or {}
    # before training the policy is its own reference: a log-ratio accuracy would be 0.5 by construction
    ref_acc = report.get("accuracy_ref") if which == "eval_after" else None
    return {"method": method, "accuracy": report.get("accuracy"), "accuracy_ref": ref_acc,
            "constraints": stats["extras"].get("constraints_satisfied"),
            "all_constraints": stats["extras"].get("all_constraints_satisfied"),
            "win_rate": win.get("win_rate"), "win_rate_se": win.get("win_rate_se"),
            "mean_reward": stats["mean_reward"], "reward_se": stats["reward_se"],
            "length_tokens": stats["length_tokens"], "length_words": stats["length_words"],
            "train_seconds": (train or {}).get("seconds") if which == "eval_after" else None}


def table_rows(results: list[dict]) -> list[list[str]]:
    """The table's cells (COLUMNS) for result rows as `_row` makes them; '-' where a number is absent."""
    def num(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    def pct(v, se=None):
        return "-" if v is None else f"{100 * v:.1f}%" + ("" if se is None else f" ± {100 * se:.1f}")

    out = []
    for r in results:
        reward = num(r.get("mean_reward")) + ("" if r.get("reward_se") is None else f" ± {r['reward_se']:.3f}")
        secs = r.get("train_seconds")
        out.append([r["method"], num(r.get("accuracy")), num(r.get("accuracy_ref")), pct(r.get("constraints")),
                    pct(r.get("all_constraints")), pct(r.get("win_rate"), r.get("win_rate_se")), reward,
                    f"{num(r.get('length_tokens'), '.1f')} / {num(r.get('length_words'), '.1f')}",
                    "-" if secs is None else f"{secs / 60:.1f} min"])
    return out


# the terminal table's headers (COLUMNS, shorter, so that it fits 80 columns)
SHORT = ["method", "pref acc", "acc vs ref", "constraints", "all met", "win vs base", "reward ± SE",
         "tokens / words", "train"]


def markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(results)]
    return "\n".join(lines)


def print_table(results: list[dict], title: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, caption="pref acc: held-out preference accuracy of the implicit (average log-prob) "
                                   "reward; acc vs ref: of the reference-relative reward; train: the training steps")
    for i, c in enumerate(SHORT):
        t.add_column(c, justify="left" if i == 0 else "right")
    for cells in table_rows(results):
        t.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no need to squeeze into 80 columns
        console = Console(width=120)
    console.print(t)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def evaluate(run_dir: Path | str, name: str, out: Path, args, data: str, split: str, baseline: str) -> dict:
    """`alphadpo eval reward` on one model (a retrained run's old answers are discarded by it)."""
    from alphadpo_cli.evaluation.options import DecodingOptions, ModelSpec, OutputOptions, RewardOptions
    from alphadpo_cli.rewards.evaluate import RewardEvalOptions, run_reward_eval

    return run_reward_eval(RewardEvalOptions(
        reward=RewardOptions(REWARD), data=data, split=split, model=ModelSpec(str(run_dir), preset=args.preset),
        baseline=baseline, decoding=DecodingOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        output=OutputOptions(output_dir=str(out / "eval" / name), name=name)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated (default: alpha_dpo,simpo,dpo)")
    p.add_argument("--output-dir", "-o", default="outputs/compare")
    p.add_argument("--reuse", action="store_true", help="keep runs that finished (train_results.json), retrain none")
    p.add_argument("--max-new-tokens", type=int, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--threads", type=int,
                   help="torch threads while generating (default: torch's; 1 is far faster on a CPU busy with "
                        "other work: decoding is many small ops)")
    args = p.parse_args(argv)
    from alphadpo_cli.config import resolve_config

    cfg = resolve_config(preset=args.preset)
    data, split, out = cfg.data.dataset, cfg.data.eval_split or "test", Path(args.output_dir)
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    started = time.perf_counter()
    trained = {loss: train_run(args.preset, loss, out / loss, args.reuse) for loss in losses}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = evaluate(cfg.model.name_or_path, "base", out, args, data, split, "none")
    first = next(iter(trained.values()))[0]
    results = [_row(NAMES["base"], first, base, which="eval_before")]
    for loss, (train, _) in trained.items():
        ev = evaluate(out / loss, loss, out, args, data, split, base["answers"])
        results.append(_row(NAMES.get(loss, loss), train, ev))
    when = datetime.datetime.now().strftime("%Y-%m-%d")
    title = (f"{args.preset}: {base['n_prompts']} held-out prompts, greedy answers, {machine()}, {when}, "
             f"{(time.perf_counter() - started) / 60:.1f} min in all")
    print_table(results, title)
    print(markdown(results))
    (out / "compare.json").write_text(json.dumps({"title": title, "date": when, "machine": machine(),
                                                  "preset": args.preset, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
