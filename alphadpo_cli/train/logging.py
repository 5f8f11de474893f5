"""Where training metrics go: metrics.jsonl always, TensorBoard and Weights & Biases on request,
and a live rich display on the terminal."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import ConfigError


def pair_statistics(prefix: str, values: torch.Tensor) -> dict[str, float]:
    v = values.detach().double().flatten()
    if v.numel() == 0:
        return {}
    return {
        f"{prefix}/mean": v.mean().item(),
        f"{prefix}/std": v.std(unbiased=True).item() if v.numel() > 1 else 0.0,
        f"{prefix}/min": v.min().item(),
        f"{prefix}/max": v.max().item(),
    }


class MetricSinks:
    def __init__(self, output_dir: Path, report_to: list[str], run_config: dict, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = output_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report-to wandb needs the wandb package: pip install 'alphadpo[wandb]'") from None
            self.wandb = wandb.init(config=run_config, dir=str(output_dir), reinit=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            fh.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class LiveProgress:
    """Step, loss, accuracy, pairs/s and ETA on one line; a metric line at every logging step."""

    def __init__(self, console: Console, total_steps: int, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} pairs/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, loss="-", acc="-", speed="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, step: int, metrics: dict[str, float] | None = None) -> None:
        fields = {}
        if metrics:
            fields = {
                "loss": f"{metrics.get('loss', float('nan')):.4f}",
                "acc": f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                "speed": f"{metrics.get('pairs_per_second', float('nan')):.2f}",
            }
        self.progress.update(self.task, completed=step, **fields)

    def log_line(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        keys = ["loss", "rewards/accuracies", "rewards/margins", "margin/mean", "normalizer/sigma", "grad_norm", "learning_rate"]
        parts = [f"{k.split('/')[-1] if k != 'rewards/margins' else 'reward_margin'}={metrics[k]:.4g}" for k in keys if k in metrics and metrics[k] is not None]
        self.progress.console.print(f"step {step}: " + "  ".join(parts))
