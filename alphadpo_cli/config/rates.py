"""The mode and learning rate a run uses: model.mode=auto resolved by the number of processes,
training.learning_rate or the rate `training.learning_rates` gives for that mode, and the
gradient accumulation that keeps the global batch."""

from __future__ import annotations

import math
from typing import Any

from ..ranges import Range
from ..values import did_you_mean
from .errors import ConfigError
from .parse import coerce_field, fmt, parse_scalar
from .schema import Config

TRAINED_MODES = ("full", "lora", "qlora")

#: The rule the paper presets' LoRA and QLoRA learning rates follow: 10x the full fine-tuning rate.
#: Source: J. Schulman and Thinking Machines Lab, "LoRA Without Regret" (Connectionism, 2025,
#: thinkingmachines.ai/blog/lora): over model sizes and for supervised as well as RL training, the
#: best LoRA learning rate was about 10x the best full fine-tuning one (with LoRA's alpha/r scaling,
#: alpha 32, as lora.alpha here). The paper's rates are full fine-tuning rates (8 GPUs, ZeRO-3).
LORA_LR_MULTIPLIER = 10.0
LORA_LR_RULE = (f"LoRA/QLoRA learning rate = {LORA_LR_MULTIPLIER:g}x the full fine-tuning one "
                "(\"LoRA Without Regret\", Thinking Machines Lab, 2025)")
#: training.learning_rates when a config gives neither it nor training.learning_rate.
DEFAULT_LEARNING_RATES = {"full": 1e-6, "lora": 1e-5, "qlora": 1e-5}


def parse_learning_rates(value: Any, where: str) -> dict:
    """training.learning_rates read: a mapping of modes (full, lora, qlora) to numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of model.mode to a learning rate, e.g. "
                          "{full: 1.0e-6, lora: 1.0e-5, qlora: 1.0e-5}")
    out = {}
    for mode, rate in value.items():
        if mode not in TRAINED_MODES:
            close = did_you_mean(mode, TRAINED_MODES, cutoff=0.5)
            raise ConfigError(f"{where}: unknown mode {mode!r}." + (f" Did you mean '{close}'?" if close else
                                                                    f" Valid: {', '.join(TRAINED_MODES)}."))
        out[mode] = coerce_field(parse_scalar(rate), "float", f"{where}.{mode}")
    return out


def check_learning_rates(cfg: Config) -> None:
    """training.learning_rates: known modes, rates > 0, and (without training.learning_rate) a rate
    for every mode this config can run in (model.mode=auto: full and lora)."""
    t = cfg.training
    rates = parse_learning_rates(t.learning_rates, "training.learning_rates")
    rng = Range(lo=0.0, lo_open=True)
    for mode, rate in rates.items():
        if not rng.contains(rate):
            raise ConfigError(f"training.learning_rates.{mode} = {fmt(rate)} is out of range: allowed {rng.describe()}")
    if t.learning_rate is None and rates:
        needed = ("full", "lora") if cfg.model.mode == "auto" else (cfg.model.mode,)
        missing = [mode for mode in needed if mode not in rates]
        if missing:
            raise ConfigError(
                f"training.learning_rates has no rate for model.mode={missing[0]}"
                + (" (model.mode=auto runs full on several processes, lora on one)" if cfg.model.mode == "auto" else "")
                + f": add training.learning_rates.{missing[0]}, or set training.learning_rate")


def resolve_mode(mode: str, num_processes: int) -> str:
    """model.mode as a run uses it: auto is full fine-tuning on several processes (as the paper), else LoRA."""
    if mode == "auto":
        return "full" if num_processes > 1 else "lora"
    return mode


def resolve_learning_rate(cfg: Config, mode: str) -> tuple[float, str]:
    """(the learning rate a run in `mode` uses, where it came from).

    training.learning_rate wins when set (the user's --set or config file, a preset with one rate,
    a resolved run's config.yaml); else training.learning_rates[mode] (the paper presets), else
    DEFAULT_LEARNING_RATES[mode]. The source names the layer that set it and, for a LoRA/QLoRA rate
    that is LORA_LR_MULTIPLIER x the full one, the rule."""
    t, origins = cfg.training, cfg.origins
    if t.learning_rate is not None:
        return float(t.learning_rate), origins.get("learning_rate", "training.learning_rate")
    rates = parse_learning_rates(t.learning_rates, "training.learning_rates")
    where = None
    if not rates:
        rates, where = DEFAULT_LEARNING_RATES, "default"
    if mode not in rates:
        raise ConfigError(f"training.learning_rates has no rate for model.mode={mode}: add "
                          f"training.learning_rates.{mode}, or set training.learning_rate")
    where = where or origins.get(f"learning_rates.{mode}", "training.learning_rates")
    lr = float(rates[mode])
    rule = (mode != "full" and "full" in rates
            and math.isclose(lr, LORA_LR_MULTIPLIER * float(rates["full"]), rel_tol=1e-9))
    return lr, f"{where} ({mode}" + (f" = {LORA_LR_MULTIPLIER:g}x full rule)" if rule else ")")


def resolve_for_processes(cfg: Config, num_processes: int) -> str:
    """Fix what depends on the number of processes: model.mode=auto becomes full or lora and
    training.learning_rate the rate of that mode (so the run's config.yaml records both as used).
    Returns where the rate came from (kept in `cfg.origins` too: resolving again says the same)."""
    mode = resolve_mode(cfg.model.mode, num_processes)
    lr, source = resolve_learning_rate(cfg, mode)
    cfg.model.mode = mode
    cfg.training.learning_rate = lr
    cfg.origins = {**cfg.origins, "learning_rate": source}
    return source


def gradient_accumulation_steps(cfg: Config, num_processes: int) -> int:
    """Keep the preset's global batch whatever the number of processes."""
    per_step = cfg.training.per_device_batch_size * num_processes
    if cfg.training.global_batch_size % per_step:
        raise ConfigError(
            f"global batch {cfg.training.global_batch_size} is not divisible by per-device batch "
            f"{cfg.training.per_device_batch_size} x {num_processes} processes"
        )
    return cfg.training.global_batch_size // per_step

