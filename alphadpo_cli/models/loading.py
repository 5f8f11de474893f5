"""Loading the policy, its reference and tokenizer.

LoRA and QLoRA runs keep one copy of the weights: the reference is the same model with its
adapters disabled. Full fine-tuning loads a separate frozen reference (or none at all when the
reference log-probs are precomputed).

QLoRA: the 4-bit NF4 base (`models.quantized`), prepared by peft's `prepare_model_for_kbit_training`.
The reference is that 4-bit base with the adapters disabled; `merged_model` (`models.merging`) writes
the adapters merged into the dequantised base.

The pieces live in their own modules and are re-exported here, where the rest of the package imports
them from: `models.runtime` (quiet libraries, dtype, device, notices, attention implementation),
`models.tiny` (the tiny random model), `models.pretrained` (the tokenizer and the base network),
`models.quantized` (4-bit), `models.identity` (source and fingerprint), `models.inference`
(`load_for_inference`), `models.merging` (`merged_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LoraConfig, ModelConfig
from ..hardware import cpu_has_native_bf16  # noqa: F401 (the one CPU detection; re-exported here)
from .identity import model_fingerprint, model_source  # noqa: F401
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
    fingerprint: str


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


def load_models(cfg: ModelConfig, lora: LoraConfig, *, need_reference_model: bool, seed: int = 0) -> LoadedModels:
    """Build the policy (and a reference network only when one is needed and not shared)."""
    from .checkpointing import enable_checkpointing

    quiet_libraries()
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    base = load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    reference = None
    if cfg.mode == "qlora":
        base = prepare_4bit(base)
    if cfg.mode in ("lora", "qlora"):
        policy = _apply_lora(base, lora)
    else:
        policy = base
        if need_reference_model:
            reference = load_base(cfg, tokenizer, dtype, seed=seed)
            freeze(reference)
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
        fingerprint=model_fingerprint(cfg, dtype, seed),
    )


def load_reference_only(cfg: ModelConfig, seed: int = 0):
    """The frozen initial model, for precomputing reference log-probs before training (for QLoRA the
    4-bit base, prepared as the policy's is: the adapter-disabled policy computes the same numbers)."""
    quiet_libraries()
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    if cfg.mode == "qlora":
        model = prepare_4bit(model)
    freeze(model)
    return model
