"""Validation: every numeric setting is checked against `RANGES` when the config is resolved, then
the choices and the relations between settings, before anything loads."""

from __future__ import annotations

from typing import Any

from ..ranges import Range
from .errors import ConfigError
from .parse import fmt
from .rates import check_learning_rates
from .schema import Config

POSITIVE_INT = Range(lo=1)
NON_NEGATIVE_INT = Range(lo=0)

#: The allowed values of every numeric config key (tests/test_config.py checks that each numeric
#: field of every section has an entry, and tries a value out of each range).
RANGES: dict[str, Range] = {
    "model.tiny_hidden_size": POSITIVE_INT,
    "model.tiny_layers": POSITIVE_INT,
    "model.tiny_heads": POSITIVE_INT,
    "lora.r": POSITIVE_INT,
    "lora.alpha": POSITIVE_INT,
    "lora.dropout": Range(lo=0.0, hi=1.0, hi_open=True),
    "data.max_samples": Range(lo=1, optional=True, note="null: all rows"),
    "data.max_eval_samples": Range(lo=1, optional=True, note="null: all rows"),
    "data.max_length": Range(lo=2),
    "data.max_prompt_length": POSITIVE_INT,
    "training.num_epochs": Range(lo=0.0, lo_open=True),
    "training.max_steps": Range(lo=1, also=(-1,), note="-1: train num_epochs"),
    "training.learning_rate": Range(lo=0.0, lo_open=True, optional=True,
                                    note="null: from training.learning_rates by model.mode"),
    "training.warmup_ratio": Range(lo=0.0, hi=1.0, hi_open=True),
    "training.weight_decay": Range(lo=0.0),
    "training.adam_beta1": Range(lo=0.0, hi=1.0, hi_open=True),
    "training.adam_beta2": Range(lo=0.0, hi=1.0, hi_open=True),
    "training.adam_epsilon": Range(lo=0.0, lo_open=True),
    "training.max_grad_norm": Range(lo=0.0, note="0: no clipping"),
    "training.per_device_batch_size": POSITIVE_INT,
    "training.global_batch_size": POSITIVE_INT,
    "training.seed": Range(lo=0, hi=2**32 - 1),
    "training.logging_steps": POSITIVE_INT,
    "training.save_steps": Range(lo=0, note="0: no periodic checkpoints"),
    "training.save_total_limit": Range(lo=0, note="0: keep every checkpoint"),
    "training.eval_steps": Range(lo=0, note="0: evaluate before and after training only"),
    "training.eval_batch_size": POSITIVE_INT,
    "training.ref_batch_size": POSITIVE_INT,
    "training.logprob_chunk_size": Range(lo=0, note="0: automatic"),
    "training.token_budget": POSITIVE_INT,
    "training.checkpoint_layers": Range(lo=-1, note="-1: as model.gradient_checkpointing says"),
    "training.max_nonfinite_steps": POSITIVE_INT,
    "generation.temperature": Range(lo=0.0, note="0: greedy"),
    "generation.top_p": Range(lo=0.0, hi=1.0, lo_open=True),
    "generation.max_new_tokens": POSITIVE_INT,
    "generation.stop_token_ids": NON_NEGATIVE_INT,  # each element
    "launch.num_gpus": Range(lo=1, optional=True, note="null: all visible GPUs"),
    "launch.num_machines": POSITIVE_INT,
    "launch.machine_rank": NON_NEGATIVE_INT,
    "launch.main_process_port": Range(lo=1, hi=65535),
}


def check_ranges(cfg: Config) -> None:
    """Every numeric setting within its range, or one ConfigError naming the key, the value and
    what is allowed."""
    for key, rng in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not rng.contains(v):
                shown = f"{fmt(value)} (element {fmt(v)})" if isinstance(value, list) else fmt(value)
                raise ConfigError(f"{key} = {shown} is out of range: allowed {rng.describe()}")


def check_loss_params(name: str, params: dict) -> Any:
    """The method's parameters as `losses.make_params` builds them (it checks every value against
    `ranges.LOSS_PARAM_RANGES`); errors name the key as `loss.params.<key>`."""
    from ..losses import UnknownLossError, get_loss, make_params

    try:
        get_loss(name)
    except UnknownLossError as exc:
        raise ConfigError(f"loss.name = {fmt(name)}: {exc}") from None
    params = dict(params or {})
    try:
        resolved = make_params(name, params)
    except ValueError as exc:
        for key, value in params.items():  # name the key that make_params refused
            try:
                make_params(name, {key: value})
            except ValueError as one:
                raise ConfigError(f"loss.params.{key} = {fmt(value)}: {one}") from None
        raise ConfigError(f"loss.params ({', '.join(f'{k}={fmt(v)}' for k, v in params.items())}): {exc}") from None
    return resolved


def validate(cfg: Config) -> None:
    """Cheap checks that must fail before any model is loaded (every single numeric range is in
    `RANGES`, checked first; what follows are choices and relations between settings)."""
    check_ranges(cfg)
    m, d, t = cfg.model, cfg.data, cfg.training
    if m.mode not in ("full", "lora", "qlora", "auto"):
        raise ConfigError(f"model.mode must be full, lora, qlora or auto, not '{m.mode}'")
    check_learning_rates(cfg)
    if m.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"model.dtype must be auto, bf16, fp16 or fp32, not '{m.dtype}'")
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({d.max_prompt_length}) must be smaller than data.max_length "
            f"({d.max_length}), or no response token would fit"
        )
    if d.truncation not in ("keep_end", "drop", "error"):
        raise ConfigError(f"data.truncation must be keep_end, drop or error, not '{d.truncation}'")
    if d.pipeline not in ("default", "authors"):
        raise ConfigError(f"data.pipeline must be default or authors, not '{d.pipeline}'")
    if d.pipeline == "authors" and d.truncation != "keep_end":
        raise ConfigError(
            f"data.truncation={d.truncation} is not available with data.pipeline=authors: the authors' "
            "pipeline always truncates (keep_end). Use data.truncation=keep_end, or data.pipeline=default."
        )
    if t.global_batch_size % t.per_device_batch_size:
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"training.per_device_batch_size ({t.per_device_batch_size})"
        )
    if t.lr_scheduler not in ("cosine", "linear", "constant"):
        raise ConfigError(f"training.lr_scheduler must be cosine, linear or constant, not '{t.lr_scheduler}'")
    for dest in t.report_to:
        if dest not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"training.report_to: unknown destination '{dest}' (tensorboard, wandb)")
    if m.name_or_path == "tiny-random":
        kv = max(1, m.tiny_heads // 2)
        if m.tiny_hidden_size % m.tiny_heads or m.tiny_heads % kv:
            raise ConfigError(
                f"model.tiny_hidden_size ({m.tiny_hidden_size}) must be a multiple of model.tiny_heads "
                f"({m.tiny_heads}), and tiny_heads 1 or even"
            )
    if cfg.launch.machine_rank >= cfg.launch.num_machines:
        raise ConfigError(
            f"launch.machine_rank = {cfg.launch.machine_rank} is out of range: allowed 0 to "
            f"{cfg.launch.num_machines - 1} (launch.num_machines - 1; --machine-rank / --num-machines)"
        )
    check_loss_params(cfg.loss.name, cfg.loss.params)
