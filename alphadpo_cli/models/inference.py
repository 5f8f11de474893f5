"""Loading a model, with an optional LoRA adapter, for generation and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from .pretrained import freeze, load_base, load_tokenizer
from .quantized import prepare_4bit
from .runtime import default_device, quiet_libraries, resolve_dtype


def load_for_inference(
    model: str,
    adapter: str | None = None,
    *,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    chat_template: str | None = None,
    tiny_seed: int = 0,
):
    """(model, tokenizer) for generation and scoring: a base plus an optional LoRA adapter.

    `model` may also be a training output directory holding an adapter and its config. The adapter
    of a QLoRA run (its config.yaml says model.mode: qlora) is loaded on the 4-bit base it was
    trained on, prepared as in training.
    """
    quiet_libraries()
    if adapter is None and (Path(model) / "adapter_config.json").is_file():
        adapter, model = str(model), None  # a LoRA output dir: base recorded in its config
    cfg = ModelConfig(name_or_path=model or "", dtype=dtype, chat_template=chat_template)
    if adapter is not None:
        cfg = _adapter_model_config(Path(adapter), model, cfg)
    tokenizer = load_tokenizer(cfg)
    qlora = adapter is not None and cfg.mode == "qlora"
    net = load_base(cfg, tokenizer, resolve_dtype(cfg.dtype), quantize_4bit=qlora, seed=tiny_seed)
    if qlora:
        net = prepare_4bit(net)
    if adapter is not None:
        net = _attach_adapter(net, adapter, cfg)
    net.to(device or default_device())
    freeze(net)
    return net, tokenizer


def _adapter_model_config(adir: Path, model: str | None, cfg: ModelConfig) -> ModelConfig:
    """The model config an adapter is loaded with: its training run's (config.yaml: base, mode) where
    there is one, else `cfg` with the base named by `model` or by adapter_config.json."""
    if not (adir / "adapter_config.json").is_file():
        raise ConfigError(f"adapter directory {adir} has no adapter_config.json")
    run_cfg = adir / "config.yaml"
    if run_cfg.is_file():
        from ..config import load_config_file

        trained = load_config_file(run_cfg).model
        if not model:
            trained.dtype, trained.chat_template = cfg.dtype, cfg.chat_template or trained.chat_template
            return trained
        if trained.name_or_path != model:
            raise ConfigError(
                f"adapter {adir} was trained on base model '{trained.name_or_path}', "
                f"not '{model}'. Pass --model {trained.name_or_path} (or omit --model)."
            )
        cfg.mode = trained.mode  # qlora: the adapter belongs on the 4-bit base
    elif not model:
        base = _adapter_base_name(adir)
        if not base:
            raise ConfigError(f"adapter {adir}: cannot tell its base model; pass --model")
        cfg.name_or_path = base
    return cfg


def _adapter_base_name(adapter_dir: Path) -> str | None:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    return json.loads(cfg_file.read_text()).get("base_model_name_or_path")


def _attach_adapter(net, adapter: str, cfg: ModelConfig):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(net, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"adapter {adapter} does not fit base model '{cfg.name_or_path}': {str(exc).splitlines()[0]}"
        ) from None
