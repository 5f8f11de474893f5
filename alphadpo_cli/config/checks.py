"""Validation: every numeric setting is checked against `RANGES` when the config is resolved, then
the choices and the relations between settings, before anything loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..ranges import Range
from .errors import ConfigError
from .parse import fmt
from .rates import check_learning_rates
from .schema import Config, ModelConfig

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
    check_model_start(m)
    check_loss_params(cfg.loss.name, cfg.loss.params)


def adapter_config(path: str) -> dict:
    """The `adapter_config.json` of `model.init_adapter`'s directory, or one ConfigError naming the key."""
    where = Path(path).expanduser()
    if not where.is_dir():
        raise ConfigError(f"model.init_adapter = {path}: no such directory (a saved PEFT LoRA adapter: the "
                          "output directory of a `train` run with model.mode=lora or qlora)")
    file = where / "adapter_config.json"
    if not file.is_file():
        raise ConfigError(f"model.init_adapter = {path}: no adapter_config.json there, so it is not a saved "
                          "PEFT adapter (a `train` run with model.mode=lora or qlora writes one into its output "
                          "directory; a merged or full model goes in model.name_or_path instead)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_adapter = {path}: {file.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else None
        raise ConfigError(f"model.init_adapter = {path}: a {kind or 'non-LoRA'} adapter; only LoRA adapters "
                          "can start a lora/qlora run")
    return data


def same_local_path(a: str | None, b: str | None) -> bool | None:
    """True/False when `a` and `b` are both existing local paths (the same directory or not), else None."""
    if not a or not b:
        return None
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.exists() and pb.exists()):
        return None
    return pa.resolve() == pb.resolve()


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1


def check_model_start(m: ModelConfig) -> None:
    """`model.init_adapter` (lora/qlora: a LoRA adapter on the same base) and `model.reference` (full: a
    separate frozen reference), checked from files alone: nothing loads. With model.mode=auto the mode
    checks wait for the mode to resolve (`models.loading.load_models` runs this again)."""
    if m.init_adapter is not None:
        if m.mode == "full":
            raise ConfigError(
                f"model.init_adapter = {m.init_adapter}: only with model.mode lora or qlora, where the policy is "
                "a LoRA adapter on model.name_or_path; a full fine-tuning run starts from model.name_or_path "
                "(merge the adapter into a model and name that instead)")
        base = adapter_config(m.init_adapter).get("base_model_name_or_path")
        if same_local_path(base, m.name_or_path) is False:
            raise ConfigError(
                f"model.init_adapter = {m.init_adapter} was trained on the base model {base}, but "
                f"model.name_or_path is {m.name_or_path}, another directory: set model.name_or_path to the "
                "adapter's base")
    if m.reference is not None:
        if m.mode in ("lora", "qlora"):
            raise ConfigError(
                f"model.reference = {m.reference}: only with model.mode=full. With model.mode={m.mode} the "
                "reference is the policy with its adapters disabled (model.name_or_path), with no second model "
                "to name; drop model.reference, or train with model.mode=full")
        if not m.reference.strip():
            raise ConfigError("model.reference is empty: name a model (hub id, directory, .gguf, pkg:) or null")
        if _looks_local(m.reference) and not m.reference.startswith("pkg:") \
                and not Path(m.reference).expanduser().exists():
            raise ConfigError(f"model.reference = {m.reference}: no such file or directory")
