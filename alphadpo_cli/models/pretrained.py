"""The tokenizer and the base network of a model spec, shared by training and inference loading."""

from __future__ import annotations

import torch

from ..config import ConfigError, ModelConfig
from .identity import model_source
from .quantized import bnb_4bit_config, check_4bit_support, keep_4bit_layout, qlora_compute_dtype, quantization_device
from .runtime import TINY, resolve_attn_implementation
from .templates import CHAT_TEMPLATES
from .tiny import build_tiny_model, build_tiny_tokenizer


def load_tokenizer(cfg: ModelConfig):
    if cfg.name_or_path == TINY and not cfg.tokenizer:
        tok = build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        src = cfg.tokenizer or model_source(cfg)
        if cfg.tokenizer:
            from .sources import resolve_model_source

            src = resolve_model_source(cfg.tokenizer, check_hub=True)
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
        except OSError as exc:
            raise ConfigError(
                f"could not load the tokenizer of '{cfg.tokenizer or cfg.name_or_path}': {exc}. "
                "Pass a local directory or a hub id that is reachable (set HF_HUB_OFFLINE=0 if needed)."
            ) from None
    if cfg.chat_template:
        tok.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    if tok.chat_template is None:
        raise ConfigError(
            f"the tokenizer of '{cfg.name_or_path}' has no chat template; set model.chat_template "
            "(chatml, gemma, mistral, or a Jinja string)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, tokenizer, dtype: torch.dtype, quantize_4bit: bool = False, seed: int = 0):
    """The base network in `dtype`; with `quantize_4bit`, 4-bit NF4 (bitsandbytes) on `quantization_device()`."""
    attn = resolve_attn_implementation(cfg.attn_implementation, dtype)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    if quantize_4bit:
        device = quantization_device()
        compute = qlora_compute_dtype(dtype, device)
        check_4bit_support(device, compute)
        # loaded in the compute dtype: the weights are quantised from it, and the others end in float32
        # anyway (`prepare_4bit`), so nothing is rounded to bf16 on the way when the 4-bit layers compute in float32
        kwargs.update(dtype=compute, quantization_config=bnb_4bit_config(compute), device_map={"": device})
    if cfg.name_or_path == TINY:
        model = build_tiny_model(cfg, vocab_size=len(tokenizer), seed=seed, attn_implementation=attn)
        return _tiny_4bit(model, kwargs) if quantize_4bit else model.to(dtype)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_source(cfg), **kwargs)
    except OSError as exc:
        raise ConfigError(f"could not load model '{cfg.name_or_path}': {exc}") from None
    return keep_4bit_layout(model) if quantize_4bit else model


def _tiny_4bit(model, kwargs: dict):
    """The in-memory tiny model quantised as a real one: bitsandbytes quantises while transformers loads
    weights, so it goes through a temporary checkpoint (a few hundred kB), exactly as a model on disk would."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="alphadpo-tiny-") as tmp:
        model.save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    model.name_or_path = model.config._name_or_path = ""  # as in memory: not the deleted temporary dir
    return keep_4bit_layout(model)


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
