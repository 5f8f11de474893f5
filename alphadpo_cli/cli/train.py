"""`alphadpo train`: resolve the config from a preset or file plus flags, relaunch under
`accelerate launch` when several processes are asked for, then train (`alphadpo_cli.train`)."""

from __future__ import annotations

import os
import sys

import click

from .common import console, friendly, results


#: The flags that set one config key each, applied as `--set KEY=VALUE` (after the preset, the file and
#: the user's own --set) when given.
FLAG_KEYS = {
    "model": "model.name_or_path", "dataset": "data.dataset", "mode": "model.mode",
    "output_dir": "training.output_dir", "max_samples": "data.max_samples", "max_steps": "training.max_steps",
    "precompute_ref": "training.precompute_ref", "report_to": "training.report_to", "merge": "training.merge",
    "seed": "training.seed", "num_gpus": "launch.num_gpus", "num_machines": "launch.num_machines",
    "machine_rank": "launch.machine_rank", "main_process_ip": "launch.main_process_ip",
}


def _config_from_options(preset, config_file, overrides, loss, num_processes, flags: dict):
    from ..config import ConfigError, resolve_config

    if not preset and not config_file:
        raise ConfigError("give --preset NAME or --config FILE (see `alphadpo presets list`)")
    flags = {**flags, "num_gpus": _num_gpus(flags["num_gpus"], num_processes)}
    sets = list(overrides) + [f"{key}={flags[name]}" for name, key in FLAG_KEYS.items() if flags[name] is not None]
    return resolve_config(preset=preset, config_file=config_file, overrides=sets, loss=loss)


def _num_gpus(num_gpus: int | None, num_processes: int | None) -> int | None:
    """--num-processes is another name for --num-gpus (clearer on a CPU machine)."""
    from ..config import ConfigError

    if num_processes is None:
        return num_gpus
    if num_gpus is not None and num_gpus != num_processes:
        raise ConfigError(f"--num-gpus {num_gpus} and --num-processes {num_processes} disagree: give one of them")
    return num_processes


@click.command()
@click.option("--preset", "-p", help="A preset name (see `alphadpo presets list`).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML config (may `inherit: PRESET`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any key, e.g. training.learning_rate=1e-6.")
@click.option("--loss", help="Switch method (alpha_dpo, simpo, dpo, ...), with the preset's tuned settings for it.")
@click.option("--model", help="Model: hub id, local dir, .gguf file, or pkg:<package>/<file.gguf>.")
@click.option("--dataset", help="Preference data: hub id, .jsonl/.json/.parquet file, or directory.")
@click.option("--mode", type=click.Choice(["full", "lora", "qlora"]), help="Full fine-tuning, LoRA or QLoRA.")
@click.option("--output-dir", "-o", help="Where adapters/weights, config and metrics go.")
@click.option("--max-samples", type=int, help="Use only the first N training pairs.")
@click.option("--max-steps", type=int, help="Stop after N optimiser steps.")
@click.option("--precompute-ref/--no-precompute-ref", default=None, help="Precompute reference log-probs (default on).")
@click.option("--report-to", help="Comma-separated: tensorboard, wandb.")
@click.option("--merge", is_flag=True, default=None, help="Also write a merged model (LoRA).")
@click.option("--seed", type=int)
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[DIR]",
              help="Continue from the latest complete checkpoint (or the one given).")
@click.option("--allow-config-change", is_flag=True,
              help="With --resume: continue although the model, data, tokenisation, batch geometry or loss differ "
                   "from the checkpoint's config (differences are always listed).")
@click.option("--dry-run", is_flag=True, help="Validate config and data and print the plan; train nothing.")
@click.option("--num-gpus", type=int, help="Processes to launch per machine (default: all visible GPUs).")
@click.option("--num-processes", type=int,
              help="The same as --num-gpus, clearer on a machine without GPUs: N CPU processes (gloo; DeepSpeed "
                   "on the CPU with a DeepSpeed launch.accelerate_config).")
@click.option("--num-machines", type=int)
@click.option("--machine-rank", type=int)
@click.option("--main-process-ip")
@friendly
def train(preset, config_file, overrides, loss, overwrite, resume, allow_config_change, dry_run, num_processes,
          **flags):
    """Train a policy with α-DPO (or another method of the loss library)."""
    from ..config import ConfigError

    cfg = _config_from_options(preset, config_file, overrides, loss, num_processes, flags)
    from ..train.launch import maybe_relaunch

    if maybe_relaunch(cfg, sys.argv):  # several processes: this one only started them
        return
    from ..train.trainer import Plan, train as run_train

    if allow_config_change and not resume:
        raise ConfigError("--allow-config-change only applies with --resume")
    result = run_train(cfg, overwrite=overwrite, resume=(True if resume == "latest" else resume), dry_run=dry_run,
                       console=console, allow_config_change=allow_config_change)
    if isinstance(result, Plan):
        console.print("[green]dry run: config and data are valid[/]")
        return
    if os.environ.get("RANK", "0") == "0":  # one summary, not one per process
        _print_summary(result)


def _print_summary(result):
    from rich.table import Table

    t = Table(title="training summary")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("steps", str(result.steps))
    t.add_row("wall time", f"{result.seconds:.1f} s")
    if result.wall_seconds:
        t.add_row("wall time, whole run", f"{result.wall_seconds:.1f} s")
    t.add_row("pairs/s", f"{result.pairs_per_second:.2f}")
    t.add_row("tokens/s", f"{result.tokens_per_second:.1f}")
    t.add_row("MFU", f"{result.mfu:.2%}" if result.mfu is not None else "-")
    if result.skipped_nonfinite:
        t.add_row("non-finite steps skipped", str(result.skipped_nonfinite))
    if result.eval_before is not None and result.eval_after is not None:
        t.add_row("held-out accuracy before", f"{result.eval_before['accuracy']:.3f}")
        t.add_row("held-out accuracy after", f"{result.eval_after['accuracy']:.3f}")
        if result.eval_after.get("accuracy_ref") is not None:
            t.add_row("held-out ref-relative accuracy after", f"{result.eval_after['accuracy_ref']:.3f}")
    t.add_row("output", str(result.output_dir))
    t.add_row("run card", str(result.output_dir / "README.md"))
    results.print(t)
