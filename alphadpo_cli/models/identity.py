"""Where a model's weights come from and their identity, for cache keys."""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError, ModelConfig
from .quantized import qlora_compute_dtype
from .runtime import TINY


def model_source(cfg: ModelConfig) -> str:
    """Where from_pretrained should look (converting GGUF files once, see alphadpo_cli/models/sources.py)."""
    if cfg.name_or_path == TINY:
        return TINY
    from .sources import resolve_model_source

    try:
        return resolve_model_source(cfg.name_or_path, check_hub=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def model_fingerprint(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> str:
    """Identity of the reference weights and of how they compute, for cache keys: the weights
    (`sources.weights_identity`: a hub snapshot's commit, else the content of the local weight and
    config files; never a path, a modification time or whether the hub was reachable), the dtype,
    the attention implementation and, for QLoRA, the 4-bit scheme. The tiny random model: its
    shape, seed and the torch version that draws it. The same online and offline."""
    from ..integrity import json_sha256

    ident: dict = {"dtype": str(dtype), "attn_implementation": cfg.attn_implementation}
    if cfg.mode == "qlora":  # a 4-bit base computes other numbers than its bf16/fp32 original
        ident["quantization"] = f"nf4-double-quant:{qlora_compute_dtype(dtype)}"
    if cfg.name_or_path == TINY:
        ident["tiny"] = [cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed, torch.__version__]
    else:
        from .sources import SourceError, weights_identity

        try:
            ident["weights"] = weights_identity(model_source(cfg))
        except SourceError as exc:
            raise ConfigError(str(exc)) from None
    return json_sha256(ident)


def reference_config(cfg: ModelConfig) -> ModelConfig:
    """The frozen reference's ModelConfig: `cfg` itself, or with `model.reference` set (full fine-tuning) that
    model, loaded with the policy's dtype, attention and trust settings (scored with the policy's tokenizer)."""
    if cfg.reference is None:
        return cfg
    return dataclasses.replace(cfg, name_or_path=cfg.reference, tokenizer=None, reference=None, init_adapter=None)


def reference_fingerprint(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> str:
    """The identity of the model that computes the reference log-probs (the reference cache's key): the
    `model.reference` model when one is named, else the policy's base (`model.init_adapter` changes the
    policy, not its adapter-disabled reference)."""
    return model_fingerprint(reference_config(cfg), dtype, seed)


def policy_fingerprint(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> str:
    """The identity of the policy's starting weights: the base's, and with `model.init_adapter` the
    adapter's files (content, as `sources.weights_identity` reads a local directory)."""
    base = model_fingerprint(cfg, dtype, seed)
    if cfg.init_adapter is None:
        return base
    from ..integrity import json_sha256
    from .sources import weights_identity

    return json_sha256({"base": base, "init_adapter": weights_identity(cfg.init_adapter)})
