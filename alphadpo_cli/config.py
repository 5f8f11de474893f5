"""Typed configuration, presets and command-line overrides.

A run is described by one `Config`. Presets are YAML files shipped inside the wheel
(`alphadpo_cli.presets`); a preset may `inherit` another, may carry per-method `variants`
(the SimPO and DPO settings tuned for the same model), and every key can be overridden with
`--set section.key=value`. Misspelled keys are refused with a suggestion, before any compute.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import yaml

from .ranges import Range
from .values import BadValue, coerce, did_you_mean, kind_from_annotation, parse_number


class ConfigError(ValueError):
    """A configuration mistake the user can fix; printed without a traceback."""


@dataclass
class ModelConfig:
    # A hub id, a local directory, a .gguf file, `pkg:<package>/<file.gguf>`, or `tiny-random`.
    name_or_path: str = "tiny-random"
    tokenizer: str | None = None
    # full: separate frozen reference; lora: reference = adapters disabled; qlora: 4-bit base + LoRA;
    # auto: full when launched on several processes, else lora.
    mode: str = "lora"
    # auto picks bf16 on GPUs that support it, else fp32 (CPU) or fp16.
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    # None keeps the tokenizer's own template; "chatml", "gemma" and "mistral" install those (the
    # latter two as the α-DPO authors wrote them); any other string is a Jinja template.
    chat_template: str | None = None
    trust_remote_code: bool = False
    # Shape of the randomly initialised `tiny-random` model.
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"


@dataclass
class DataConfig:
    # Hub id, local file (.jsonl/.json/.parquet), directory, or pkg:<package>/<path> (data shipped in
    # an installed package: pkg:alphadpo_cli/demo is the demo set).
    dataset: str = "pkg:alphadpo_cli/demo"
    train_split: str = "train"
    # Held-out split for evaluation; None disables evaluation.
    eval_split: str | None = "test"
    # Another dataset (file, directory or hub id) to take the held-out split from.
    eval_dataset: str | None = None
    max_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 2048
    max_prompt_length: int = 1800
    # What to do with a prompt longer than max_prompt_length: keep its end, drop the row (counted), or stop.
    truncation: str = "keep_end"
    # Tokenisation: "default" (this project's) or "authors" (an exact reproduction of the α-DPO
    # authors' TRL 0.8.6 pipeline, for matching their runs token for token; keep_end only).
    pipeline: str = "default"


@dataclass
class LossConfig:
    name: str = "alpha_dpo"
    # The method's hyperparameters (see `alphadpo_cli.losses.LOSSES[name].params_cls`).
    params: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    num_epochs: float = 1.0
    # > 0: train exactly this many optimiser steps (overrides num_epochs, cycling the data).
    max_steps: int = -1
    # The optimiser's peak learning rate, whatever model.mode is. null (the paper presets): the rate
    # `learning_rates` gives for the mode the run resolves to (model.mode=auto: full on several
    # processes, lora on one); a run writes the rate it used here in its config.yaml.
    learning_rate: float | None = None
    # Per model.mode {full, lora, qlora}: the rate used when learning_rate is null. Empty: the
    # built-in DEFAULT_LEARNING_RATES. The paper presets carry the paper's full fine-tuning rate and
    # LoRA/QLoRA rates of 10x it (LORA_LR_RULE).
    learning_rates: dict = field(default_factory=dict)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_batch_size: int = 2
    # Pairs per optimiser step over all processes; accumulation = global / (per_device * processes).
    global_batch_size: int = 128
    seed: int = 42
    logging_steps: int = 10
    # 0 disables periodic checkpoints; the final model is always saved.
    save_steps: int = 0
    save_total_limit: int = 2
    # 0: evaluate only before and after training.
    eval_steps: int = 0
    eval_batch_size: int = 8
    precompute_ref: bool = True
    ref_batch_size: int = 8
    # Padding-free packing: a micro-batch's sequences go in one row, attention kept within each
    # sequence (alphadpo_cli/logps/layouts.py, alphadpo_cli/kernels/segment_attention.py). false:
    # the padded [2B, T] fallback.
    packing: bool = True
    # With packing: one prompt per pair, shared by chosen and rejected (no effect without packing).
    prefix_sharing: bool = True
    # Response tokens per LM-head chunk in the log-prob computation; 0: auto, about 2^25 logits per
    # chunk on a GPU and 2^23 on a CPU (smaller transient tensors, same speed there).
    logprob_chunk_size: int = 0
    # With packing: tokens per row when precomputing reference log-probs (no gradients stored).
    token_budget: int = 8192
    # Activation checkpointing on the first N decoder layers only (speed/memory in between);
    # -1: as model.gradient_checkpointing says (all or none).
    checkpoint_layers: int = -1
    # On CPU, have glibc give freed activation memory back to the OS (lower peak RSS).
    trim_cpu_memory: bool = True
    # Llama-style RMSNorms keep only their input for backward, not float32 copies (same outputs;
    # alphadpo_cli/kernels/norms.py). Not under DeepSpeed, which partitions the norm weights.
    lean_norms: bool = True
    report_to: list = field(default_factory=list)
    merge: bool = False
    # Consecutive non-finite steps tolerated before stopping with a checkpoint.
    max_nonfinite_steps: int = 5


@dataclass
class GenerationConfig:
    """Decoding for `alphadpo eval` (the SimPO evaluation configs)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop_token_ids: list = field(default_factory=list)


@dataclass
class LaunchConfig:
    """Multi-GPU launch (accelerate + DeepSpeed)."""

    accelerate_config: str | None = None
    num_gpus: int | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500


@dataclass
class Config:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # Per-method settings tuned for this preset: `--loss simpo` merges variants["simpo"] in.
    variants: dict = field(default_factory=dict)
    #: Where training.learning_rate and training.learning_rates were set ("preset llama3-v0.2",
    #: "user: --set training.learning_rate", ...), by key: filled by `resolve_config` and
    #: `resolve_for_processes`, shown in the plan; not a config key (never in the YAML).
    origins: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
FREE_FORM = {"variants", "loss.params"}


def parse_scalar(text: Any) -> Any:
    """YAML 1.1 reads `5e-2` as a string (the authors' configs trip on it); read numbers robustly."""
    if not isinstance(text, str):
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        number = parse_number(value)
        return value if number is None else number
    return value


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` read as the field's annotation says (`values.coerce`, strict), or a ConfigError."""
    try:
        return coerce(value, *kind_from_annotation(annotation))
    except BadValue as exc:
        raise ConfigError(f"{where}: null is not allowed here" if exc.value is None else f"{where}: {exc}") from None


def _suggest(key: str, valid: list[str]) -> str:
    close = did_you_mean(key, valid, cutoff=0.5)
    return f" Did you mean '{close}'?" if close is not None else f" Valid keys: {', '.join(sorted(valid))}."


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = SECTIONS[section].default_factory  # type: ignore[misc]
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config, refusing unknown keys with a suggestion."""
    cfg = Config()
    for key, value in (data or {}).items():
        if key in ("inherit",):
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{key}'.{_suggest(key, list(SECTIONS))}")
        if key == "description":
            cfg.description = str(value or "")
            continue
        if key == "variants":
            cfg.variants = copy.deepcopy(value or {})
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping")
        fields = _section_fields(key)
        section = getattr(cfg, key)
        for sub, subval in value.items():
            if sub not in fields:
                raise ConfigError(f"{source}: unknown key '{key}.{sub}'.{_suggest(sub, list(fields))}")
            if key == "loss" and sub == "params":
                subval = {k: parse_scalar(v) for k, v in (subval or {}).items()}
            elif key == "training" and sub == "learning_rates":
                subval = _learning_rates(subval, f"{source}: training.learning_rates")
            else:
                subval = _coerce(subval, fields[sub].type, f"{source}: {key}.{sub}")
            setattr(section, sub, subval)
    return cfg


def _learning_rates(value: Any, where: str) -> dict:
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
        out[mode] = _coerce(parse_scalar(rate), "float", f"{where}.{mode}")
    return out


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------
# presets


def _preset_dir():
    return resources.files("alphadpo_cli.presets")


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in _preset_dir().iterdir()
        if p.name.endswith(".yaml") and not p.name.startswith("_")
    )


def _read_yaml(path_or_text, source: str) -> dict:
    try:
        data = yaml.safe_load(path_or_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data


def _is_path_ref(ref: str) -> bool:
    """`inherit:` names a file (relative to the referring file) rather than a preset."""
    return ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref or ref.startswith(("~", "."))


def _check_cycle(ident: str, label: str, chain: tuple) -> tuple:
    idents = [i for i, _ in chain]
    if ident in idents:
        loop = [lbl for _, lbl in chain[idents.index(ident):]] + [label]
        raise ConfigError(f"circular inherit: {' -> '.join(loop)} (a config cannot inherit itself)")
    return chain + ((ident, label),)


def _inherit(data: dict, source: str, base_dir: Path | None, chain: tuple) -> dict:
    """`data` merged over what its `inherit:` names (a preset, or a YAML file relative to base_dir)."""
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{source}: inherit must be a preset name or a path to a YAML file, not {parent!r}")
    parent = parent.strip()
    if _is_path_ref(parent):
        if base_dir is None:  # a shipped preset: its parents are presets too
            stem = parent[: -len(Path(parent).suffix)] if parent.endswith((".yaml", ".yml")) else parent
            if "/" in stem or "\\" in stem:
                raise ConfigError(f"{source}: inherit {parent!r}: a preset inherits other presets by name")
            return _deep_merge(load_preset_dict(stem, chain), data)
        return _deep_merge(load_config_dict(_resolve_relative(parent, base_dir, source), chain), data)
    return _deep_merge(load_preset_dict(parent, chain), data)


def _resolve_relative(ref: str, base_dir: Path, source: str) -> Path:
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"{source}: inherit {ref!r}: no such file {path}")
    return path


def load_preset_dict(name: str, _seen: tuple = ()) -> dict:
    """The raw (merged) mapping of a preset, following `inherit`."""
    fname = f"{name}.yaml"
    res = _preset_dir().joinpath(fname)
    if not res.is_file():
        valid = preset_names()
        close = did_you_mean(name, valid, cutoff=0.5)
        hint = f" Did you mean '{close}'?" if close is not None else ""
        raise ConfigError(f"Unknown preset '{name}'.{hint} Available presets: {', '.join(valid)}.")
    chain = _check_cycle(f"preset:{name}", f"preset {name}", tuple(_seen))
    data = _read_yaml(res.read_text(encoding="utf-8"), f"preset {name}")
    return _inherit(data, f"preset {name}", None, chain)


def load_config_dict(path: str | Path, _seen: tuple = ()) -> dict:
    """The raw (merged) mapping of a user YAML file, following `inherit` (a preset name, or a path
    relative to this file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    chain = _check_cycle(f"file:{path.resolve()}", str(path), tuple(_seen))
    data = _read_yaml(path.read_text(encoding="utf-8"), str(path))
    return _inherit(data, str(path), path.parent, chain)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. training.learning_rate=1e-6")
    key, value = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{item}': empty key")
    return path, parse_scalar(value)


def apply_override(data: dict, item: str) -> dict:
    """Apply one `section.key=value` to a raw mapping, checking the key exists."""
    path, value = parse_override(item)
    section = path[0]
    if section not in SECTIONS:
        raise ConfigError(f"override '{item}': unknown section '{section}'.{_suggest(section, list(SECTIONS))}")
    if section == "variants" or (section == "loss" and len(path) >= 2 and path[1] == "params"):
        pass  # free-form: validated by the loss registry later
    elif section == "description":
        pass
    elif path[:2] == ["training", "learning_rates"] and len(path) == 3:
        if path[2] not in TRAINED_MODES:  # training.learning_rates.lora=1e-5
            _learning_rates({path[2]: 1.0}, f"override '{item}': training.learning_rates")
    else:
        if len(path) != 2:
            raise ConfigError(f"override '{item}': expected {section}.<key>=value")
        fields = _section_fields(section)
        if path[1] not in fields:
            raise ConfigError(f"override '{item}': unknown key '{section}.{path[1]}'.{_suggest(path[1], list(fields))}")
    out = copy.deepcopy(data)
    node = out
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
    node[path[-1]] = value
    return out


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple = (),
    loss: str | None = None,
) -> Config:
    """Preset, then a user YAML file, then `--loss` variant, then `--set` overrides.

    Where the learning rate was set is kept in `Config.origins` (the plan shows it): a preset's
    ("preset NAME", "preset NAME, dpo variant") or the user's ("user: --set ...", "user: config FILE")."""
    data: dict = load_preset_dict(preset) if preset else {}
    origins: dict[str, str] = {}
    _note_origins(origins, data, f"preset {preset}")
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        user = _read_yaml(path.read_text(encoding="utf-8"), str(path))
        if "inherit" in user:  # what the file inherits sits under the preset, the file over both
            ref = user.pop("inherit")
            chain = _check_cycle(f"file:{path.resolve()}", str(path), ())
            parent = _inherit({"inherit": ref}, str(path), path.parent, chain)
            kind = "config" if isinstance(ref, str) and _is_path_ref(ref.strip()) else "preset"
            _note_origins(origins, parent, f"{kind} {str(ref).strip()} (inherited by {path})", over=data)
            data = _deep_merge(parent, data)
        _note_origins(origins, user, f"user: config {path}")
        data = _deep_merge(data, user)
    if loss:
        variant = (data.get("variants") or {}).get(loss) or {}
        _note_origins(origins, variant, f"{'preset ' + preset if preset else 'config'}, {loss} variant")
        data = apply_loss_variant(data, loss)
    for item in overrides:
        data = apply_override(data, item)
        key = parse_override(item)[0]
        if key[:1] == ["training"] and len(key) > 1 and key[1] in ("learning_rate", "learning_rates"):
            set_keys = _lr_keys({key[1]: data["training"][key[1]]}) if len(key) == 2 else {".".join(key[1:])}
            for k in set_keys:
                origins[k] = f"user: --set {'.'.join(key)}"
    cfg = from_dict(data, source=f"preset {preset}" if preset else "config")
    cfg.origins = origins
    validate(cfg)
    return cfg


def _lr_keys(section: dict | None) -> set[str]:
    """The learning-rate keys a raw `training` mapping sets: "learning_rate", "learning_rates.<mode>"."""
    section = section if isinstance(section, dict) else {}
    keys = {"learning_rate"} & set(section)
    rates = section.get("learning_rates")
    if isinstance(rates, dict):
        keys |= {f"learning_rates.{mode}" for mode in rates}
    return keys


def _note_origins(origins: dict, layer: dict, label: str, *, over: dict | None = None) -> None:
    """Record `label` for the learning-rate keys `layer` sets (unless `over`, merged on top, sets them too)."""
    for key in _lr_keys((layer or {}).get("training")) - _lr_keys((over or {}).get("training")):
        origins[key] = label


def apply_loss_variant(data: dict, loss: str) -> dict:
    """Switch method, taking this preset's tuned settings for it when it has them."""
    from .losses import get_loss

    get_loss(loss)  # unknown names fail here with the list of valid ones
    variants = data.get("variants") or {}
    out = copy.deepcopy(data)
    if loss in variants:
        out = _deep_merge(out, variants[loss])
        out.setdefault("loss", {})["name"] = loss
        if "params" in (variants[loss].get("loss") or {}):
            out["loss"]["params"] = dict(variants[loss]["loss"]["params"])
    else:
        current = (data.get("loss") or {}).get("name", LossConfig.name)
        if current != loss:
            out.setdefault("loss", {})["name"] = loss
            out["loss"]["params"] = {}
    return out


# ---------------------------------------------------------------------------------------------
# ranges: every numeric setting is checked when the config is resolved, before anything loads


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

def _fmt(value: Any) -> str:
    return "null" if value is None else repr(value)


def check_ranges(cfg: Config) -> None:
    """Every numeric setting within its range, or one ConfigError naming the key, the value and
    what is allowed."""
    for key, rng in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not rng.contains(v):
                shown = f"{_fmt(value)} (element {_fmt(v)})" if isinstance(value, list) else _fmt(value)
                raise ConfigError(f"{key} = {shown} is out of range: allowed {rng.describe()}")


def check_loss_params(name: str, params: dict) -> Any:
    """The method's parameters as `losses.make_params` builds them (it checks every value against
    `ranges.LOSS_PARAM_RANGES`); errors name the key as `loss.params.<key>`."""
    from .losses import UnknownLossError, get_loss, make_params

    try:
        get_loss(name)
    except UnknownLossError as exc:
        raise ConfigError(f"loss.name = {_fmt(name)}: {exc}") from None
    params = dict(params or {})
    try:
        resolved = make_params(name, params)
    except ValueError as exc:
        for key, value in params.items():  # name the key that make_params refused
            try:
                make_params(name, {key: value})
            except ValueError as one:
                raise ConfigError(f"loss.params.{key} = {_fmt(value)}: {one}") from None
        raise ConfigError(f"loss.params ({', '.join(f'{k}={_fmt(v)}' for k, v in params.items())}): {exc}") from None
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


# ---------------------------------------------------------------------------------------------
# the mode and learning rate a run uses

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


def check_learning_rates(cfg: Config) -> None:
    """training.learning_rates: known modes, rates > 0, and (without training.learning_rate) a rate
    for every mode this config can run in (model.mode=auto: full and lora)."""
    t = cfg.training
    rates = _learning_rates(t.learning_rates, "training.learning_rates")
    rng = Range(lo=0.0, lo_open=True)
    for mode, rate in rates.items():
        if not rng.contains(rate):
            raise ConfigError(f"training.learning_rates.{mode} = {_fmt(rate)} is out of range: allowed {rng.describe()}")
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
    rates = _learning_rates(t.learning_rates, "training.learning_rates")
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


def save_config(cfg: Config, path: str | Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())


def load_config_file(path: str | Path) -> Config:
    path = Path(path)
    return from_dict(_read_yaml(path.read_text(encoding="utf-8"), str(path)), source=str(path))
