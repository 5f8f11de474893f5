"""Where training metrics come from and go.

* per step: `gather_micro` (one micro-batch's values from every process) and `step_metrics` (the
  step's loss, rewards, log-probs, margin statistics, normaliser, gradient norm and learning rate);
* per logging window: `MetricWindow` (averages over the steps since the last record; throughput:
  pairs/s, tokens/s and MFU over the steps' own time, `throughput.py`);
* sinks: metrics.jsonl always, TensorBoard and Weights & Biases on request through accelerate's
  trackers (`MetricSinks`), and a live rich display on the terminal (`LiveProgress`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from rich.console import Console

from ..console import Bars
from ..losses import LossOutput, PreferenceLogps
from ..stats import summary_stats

# window values that are the last step's, not the window's mean
LAST_VALUE = ("learning_rate", "normalizer/mu", "normalizer/sigma", "nonfinite_skipped")


def gather_micro(accelerator, out: LossOutput, inputs: PreferenceLogps) -> dict[str, torch.Tensor]:
    """One micro-batch's logged values, gathered from every process (detached tensors, no sync):
    exactly what `step_metrics` reads; "losses" holds every pair's loss (the step's non-finite
    check reads them too)."""
    gather = accelerator.gather
    avg = lambda s, n: (s / n).detach()  # noqa: E731
    rec = {
        "losses": gather(out.losses.detach()),
        "chosen_rewards": gather(out.chosen_rewards.detach()),
        "rejected_rewards": gather(out.rejected_rewards.detach()),
        "margins": gather(out.margins.detach().reshape(-1).expand_as(out.chosen_rewards).contiguous()),
        "logps_chosen": gather(avg(inputs.policy_chosen_logps, inputs.chosen_lengths)),
        "logps_rejected": gather(avg(inputs.policy_rejected_logps, inputs.rejected_lengths)),
    }
    if inputs.ref_chosen_logps is not None:
        rec["logps_ref_chosen"] = gather(avg(inputs.ref_chosen_logps, inputs.chosen_lengths))
        rec["logps_ref_rejected"] = gather(avg(inputs.ref_rejected_logps, inputs.rejected_lengths))
    if inputs.has_token_kl:  # TDPO's δ: the per-token KL(πref‖πθ) along each response
        rec["kl_chosen"] = gather(avg(inputs.chosen_seq_kl, inputs.chosen_lengths))
        rec["kl_rejected"] = gather(avg(inputs.rejected_seq_kl, inputs.rejected_lengths))
    return rec


def step_metrics(micro: list[dict], grad_norm, lr_used: float, normalizer) -> dict[str, float]:
    """A step's metrics from its micro-batches' `gather_micro` records: means over the step's pairs
    (every micro-batch, every process; "loss" is the mean loss the update is the gradient of);
    `lr_used` is the rate the step's update used, `normalizer` the α-DPO margin normaliser after it
    (or None)."""
    cat = lambda k: torch.cat([m[k].float().reshape(-1) for m in micro])  # noqa: E731
    chosen, rejected = cat("chosen_rewards"), cat("rejected_rewards")
    metrics = {
        "loss": cat("losses").mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": cat("logps_chosen").mean().item(),
        "logps/rejected": cat("logps_rejected").mean().item(),
        "learning_rate": lr_used,
    }
    if "kl_chosen" in micro[0]:
        metrics["kl/chosen"] = cat("kl_chosen").mean().item()
        metrics["kl/rejected"] = cat("kl_rejected").mean().item()
    if "logps_ref_chosen" in micro[0]:
        metrics["logps/ref_chosen"] = cat("logps_ref_chosen").mean().item()
        metrics["logps/ref_rejected"] = cat("logps_ref_rejected").mean().item()
    metrics.update({k: v.item() for k, v in summary_stats("margin", cat("margins")).items()})
    if normalizer is not None:
        metrics["normalizer/mu"] = float(normalizer.mu)
        metrics["normalizer/sigma"] = float(normalizer.sigma)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def average(window: list[dict]) -> dict[str, float]:
    """The window's steps as one record: min of /min, max of /max, the last value of `LAST_VALUE`
    keys, the mean of the rest (steps where a value is None are left out)."""
    keys = {k for m in window for k in m}
    out = {}
    for k in keys:
        vals = [m[k] for m in window if m.get(k) is not None]
        if k.endswith("/min"):
            out[k] = min(vals)
        elif k.endswith("/max"):
            out[k] = max(vals)
        elif k in LAST_VALUE:
            out[k] = vals[-1]
        else:
            out[k] = sum(vals) / len(vals)
    return out


class MetricWindow:
    """The steps since the last logged record, with their pairs, tokens and time. The rates are over
    the steps' own seconds when `add` is given them (evaluations and checkpoints between steps are
    not training throughput), else over the time since the window started. With a `throughput`
    (`throughput.Throughput`) the record has an MFU too, where the device's peak is known."""

    def __init__(self, throughput=None):
        self.throughput = throughput
        self.reset()

    def reset(self) -> None:
        self.steps: list[dict] = []
        self.pairs = self.tokens = 0
        self.seconds: float | None = None
        self.start = time.perf_counter()

    def add(self, metrics: dict, pairs: int, tokens: int, seconds: float | None = None) -> None:
        self.steps.append(metrics)
        self.pairs += pairs
        self.tokens += tokens
        if seconds is not None:
            self.seconds = (self.seconds or 0.0) + seconds

    def record(self, epoch: float) -> dict[str, float]:
        """The record to log: the steps' `average`, throughput (pairs/s, tokens/s, MFU), the epoch."""
        elapsed = self.seconds if self.seconds is not None else time.perf_counter() - self.start
        logged = average(self.steps)
        logged["pairs_per_second"] = self.pairs / max(elapsed, 1e-9)
        logged["tokens_per_second"] = self.tokens / max(elapsed, 1e-9)
        mfu = self.throughput.mfu(logged["tokens_per_second"]) if self.throughput is not None else None
        if mfu is not None:
            logged["mfu"] = mfu
        logged["epoch"] = epoch
        return logged


class MetricSinks:
    """Where logged records go: metrics.jsonl (ours: one JSON line per record, appended; --resume cuts
    it back to the checkpoint) and the accelerator's trackers (`training.report_to`, passed to the
    Accelerator as `log_with`: a W&B run with the run's config, in project $WANDB_PROJECT or
    "alphadpo"; TensorBoard events under output_dir/tensorboard/<that project>). Only the main
    process writes; `close` finishes the trackers."""

    PROJECT = "alphadpo"

    def __init__(self, output_dir: Path, accelerator, run_config: dict, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = output_dir / "metrics.jsonl"
        self.accelerator = accelerator
        if enabled and accelerator.log_with:
            wandb = {"config": run_config, "dir": str(output_dir), "reinit": True}
            accelerator.init_trackers(os.environ.get("WANDB_PROJECT") or self.PROJECT, init_kwargs={"wandb": wandb})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            fh.flush()
        self.accelerator.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def close(self) -> None:
        """The trackers' own `finish` (`accelerator.end_training` would also tear down the process
        group, which the run still needs for the held-out report and the final save)."""
        if self.enabled:
            for tracker in self.accelerator.trackers:
                tracker.finish()


class LiveProgress:
    """Step, loss, accuracy, pairs/s, tokens/s, MFU and ETA on one line; a metric line at every
    logging step."""

    def __init__(self, console: Console, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.bars = Bars(console, disable=not enabled, label="[bold]{task.description}[/]",
                         fields="loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} pairs/s  "
                                "{task.fields[tokens]} tok/s  MFU {task.fields[mfu]}")
        self._advance = self.bars.bar("train", total_steps, loss="-", acc="-", speed="-", tokens="-", mfu="-")

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def advance(self, step: int, metrics: dict[str, float] | None = None) -> None:
        fields = {}
        if metrics:
            fields = {
                "loss": f"{metrics.get('loss', float('nan')):.4f}",
                "acc": f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                "speed": f"{metrics.get('pairs_per_second', float('nan')):.2f}",
                "tokens": f"{metrics.get('tokens_per_second', float('nan')):.0f}",
                "mfu": f"{metrics['mfu']:.1%}" if metrics.get("mfu") is not None else "-",
            }
        self._advance(completed=step, **fields)

    def log_line(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        keys = ["loss", "rewards/accuracies", "rewards/margins", "margin/mean", "normalizer/sigma", "grad_norm", "learning_rate"]
        parts = [f"{k.split('/')[-1] if k != 'rewards/margins' else 'reward_margin'}={metrics[k]:.4g}" for k in keys if k in metrics and metrics[k] is not None]
        self.bars.print(f"step {step}: " + "  ".join(parts))
