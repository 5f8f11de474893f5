"""Loading the policy, its reference and tokenizer.

LoRA and QLoRA runs keep one copy of the weights: the reference is the same model with its
adapters disabled. Full fine-tuning loads a separate frozen reference (or none at all when the
reference log-probs are precomputed).

QLoRA: the 4-bit NF4 base (`models.quantized`), prepared by peft's `prepare_model_for_kbit_training`.
The reference is that 4-bit base with the adapters disabled; `merged_model` (`models.merging`) writes
the adapters merged into the dequantised base.

Where a run starts: `model.init_adapter` (lora/qlora) starts the policy's adapter from a saved PEFT LoRA
adapter (its own LoRA settings win over `lora.*`) instead of a fresh one, the reference still the
adapter-disabled base; `model.reference` (full) names the frozen reference when it is not the policy's
starting weights, its tokenizer's vocabulary checked against the policy's before any weights load.

The pieces live in their own modules and are re-exported here, where the rest of the package imports
them from: `models.runtime` (quiet libraries, dtype, device, notices, attention implementation),
`models.tiny` (the tiny random model), `models.pretrained` (the tokenizer and the base network),
`models.quantized` (4-bit), `models.identity` (source and fingerprint), `models.inference`
(`load_for_inference`), `models.merging` (`merged_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, LoraConfig, ModelConfig
from ..config.checks import adapter_config, check_model_start, same_local_path
from ..hardware import cpu_has_native_bf16  # noqa: F401 (the one CPU detection; re-exported here)
from .identity import (model_fingerprint, model_source, policy_fingerprint, reference_config,  # noqa: F401
                       reference_fingerprint)
from .inference import load_for_inference  # noqa: F401
from .merging import merged_model  # noqa: F401
from .pretrained import freeze, load_base, load_tokenizer
from .quantized import (bnb_4bit_config, check_4bit_support, is_4bit,  # noqa: F401
                        prepare_4bit, qlora_compute_dtype, quantization_device)
from .runtime import (FLASH_ATTENTION, TINY, _NOTICES, default_device, notice,  # noqa: F401
                      quiet_libraries, resolve_attn_implementation, resolve_dtype)
from .tiny import build_tiny_model, build_tiny_tokenizer  # noqa: F401


@dataclass
class LoadedModels:
    """The trainable policy and, when it is a separate network, the frozen reference."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: object
    # True when the reference is the policy with adapters disabled.
    reference_is_adapter_disabled: bool
    # The reference's identity (`identity.reference_fingerprint`): what the reference log-prob cache keys on.
    fingerprint: str
    # The policy's starting weights' identity (`identity.policy_fingerprint`: with model.init_adapter, the
    # adapter's files too); None: the same as `fingerprint`'s model (a caller's own models).
    policy_fingerprint: str | None = None


def _apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def start_adapter(base, cfg: ModelConfig, lora: LoraConfig):
    """The trainable LoRA policy on `base`: a fresh adapter from `lora`, or `model.init_adapter`'s saved one
    (trainable, its own LoRA settings winning over `lora.*`, said in one notice when they differ)."""
    if cfg.init_adapter is None:
        return _apply_lora(base, lora)
    from peft import PeftModel

    saved = adapter_config(cfg.init_adapter)
    adapter_notices(base, cfg, lora, saved)
    try:
        return PeftModel.from_pretrained(base, str(Path(cfg.init_adapter).expanduser()), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.init_adapter = {cfg.init_adapter} does not fit model.name_or_path = "
                          f"{cfg.name_or_path}: {str(exc).splitlines()[0]}") from None


def _targets(value, base) -> object:
    """LoRA target modules as comparable short names (`all-linear`: the base's linear layers but its head)."""
    if value == "all-linear":
        head = base.get_output_embeddings()
        return frozenset(n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                         if isinstance(m, torch.nn.Linear) and m is not head)
    if isinstance(value, str):
        return value
    return frozenset(str(v).rsplit(".", 1)[-1] for v in value or ())


def adapter_notices(base, cfg: ModelConfig, lora: LoraConfig, saved: dict) -> None:
    """One notice when `model.init_adapter`'s LoRA settings differ from `lora.*` (the adapter's win), one
    when it names another base model than the policy's (refused earlier only when both are local
    directories: `config.checks.check_model_start`)."""
    pairs = [("r", saved.get("r"), lora.r), ("alpha", saved.get("lora_alpha"), lora.alpha),
             ("dropout", saved.get("lora_dropout"), lora.dropout)]
    differ = [f"{name} {mine} (lora.{name} {theirs})" for name, mine, theirs in pairs
              if mine is not None and mine != theirs]
    if _targets(saved.get("target_modules"), base) != _targets(lora.target_modules, base):
        differ.append(f"target_modules {saved.get('target_modules')} (lora.target_modules {lora.target_modules})")
    if differ:
        notice(f"model.init_adapter: the adapter's own LoRA settings are used, not lora.*: {', '.join(differ)}")
    named = saved.get("base_model_name_or_path")
    if named and named != cfg.name_or_path and same_local_path(named, cfg.name_or_path) is not True \
            and same_local_path(named, model_source(cfg)) is not True:
        notice(f"model.init_adapter: the adapter was trained on '{named}', loaded here on model.name_or_path = "
               f"'{cfg.name_or_path}'")


def check_reference_tokenizer(cfg: ModelConfig, tokenizer) -> None:
    """`model.reference`'s own tokenizer has the policy tokenizer's vocabulary (the reference scores the
    policy's token ids), or one ConfigError; read from the tokenizer files, before any weights load."""
    ref = reference_config(cfg)
    if ref is cfg:
        return
    if ref.name_or_path == TINY:
        own = build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            own = AutoTokenizer.from_pretrained(model_source(ref), trust_remote_code=ref.trust_remote_code)
        except (OSError, ValueError, TypeError):
            notice(f"model.reference = {cfg.reference} has no tokenizer of its own: its vocabulary cannot be "
                   "compared with the policy's (only its embedding size is)")
            return
    mine, theirs = tokenizer.get_vocab(), own.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"model.reference = {cfg.reference}: its tokenizer differs from the policy's ({len(theirs)} tokens "
            f"against {len(mine)}; e.g. {', '.join(f'{t!r}={i}' for t, i in differ)}). The reference scores the "
            "policy's token ids, so it needs the same vocabulary: name a reference of the same model family")


def load_reference_model(cfg: ModelConfig, tokenizer, dtype: torch.dtype, seed: int = 0):
    """The frozen reference network: `model.reference`'s model, else the policy's starting weights (for QLoRA
    the 4-bit base, prepared as the policy's is: the adapter-disabled policy computes the same numbers)."""
    ref = reference_config(cfg)
    model = load_base(ref, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    if cfg.mode == "qlora":
        model = prepare_4bit(model)
    rows = model.get_input_embeddings().num_embeddings
    if ref is not cfg and rows < len(tokenizer):
        raise ConfigError(f"model.reference = {cfg.reference}: its embedding has {rows} rows, fewer than the "
                          f"policy tokenizer's {len(tokenizer)} tokens")
    freeze(model)
    return model


def load_models(cfg: ModelConfig, lora: LoraConfig, *, need_reference_model: bool, seed: int = 0) -> LoadedModels:
    """Build the policy (and a reference network only when one is needed and not shared)."""
    from .checkpointing import enable_checkpointing

    check_model_start(cfg)  # again: model.mode=auto has resolved by now
    quiet_libraries()
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    check_reference_tokenizer(cfg, tokenizer)
    base = load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    reference = None
    if cfg.mode == "qlora":
        base = prepare_4bit(base)
    if cfg.mode in ("lora", "qlora"):
        policy = start_adapter(base, cfg, lora)
    else:
        policy = base
        if need_reference_model:
            reference = load_reference_model(cfg, tokenizer, dtype, seed)
    if cfg.gradient_checkpointing:
        # non-reentrant, the recompute under the forward's adapter casting (models.checkpointing.RecomputeAsForward)
        enable_checkpointing(policy)
        if cfg.mode != "full" and hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()
    policy.config.use_cache = False
    return LoadedModels(
        policy=policy,
        reference=reference,
        tokenizer=tokenizer,
        reference_is_adapter_disabled=cfg.mode in ("lora", "qlora"),
        fingerprint=reference_fingerprint(cfg, dtype, seed),
        policy_fingerprint=policy_fingerprint(cfg, dtype, seed),
    )


def load_reference_only(cfg: ModelConfig, seed: int = 0):
    """The frozen reference alone, for precomputing reference log-probs before training: `model.reference`'s
    model, else the initial model (for QLoRA the 4-bit base, prepared as the policy's is)."""
    quiet_libraries()
    tokenizer = load_tokenizer(cfg)
    check_reference_tokenizer(cfg, tokenizer)
    return load_reference_model(cfg, tokenizer, resolve_dtype(cfg.dtype), seed)
