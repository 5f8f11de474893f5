"""QLoRA's 4-bit base: where and in what dtype it computes, whether bitsandbytes can quantise here, its
quantisation config, the CPU layout workaround and peft's k-bit preparation.

The base is quantised by bitsandbytes to 4-bit NF4 with double quantisation and prepared by peft's
`prepare_model_for_kbit_training` (its other weights in float32), on a GPU or on a CPU (bitsandbytes
>= 0.46 has CPU 4-bit kernels). The 4-bit matmuls compute in the model dtype on a GPU; on a CPU in bf16
where it multiplies bf16 natively (`cpu_has_native_bf16`), else in float32. Merging the adapters into
the dequantised base: `models.merging`.
"""

from __future__ import annotations

import os

import torch

from ..config import ConfigError
from ..hardware import cpu_has_native_bf16
from .runtime import notice


def quantization_device() -> torch.device:
    """Where a 4-bit model is loaded: this process's GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def qlora_compute_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The dtype the 4-bit matmuls compute in: the model dtype on a GPU; on a CPU bf16 where the CPU
    multiplies bf16 natively and bf16/fp16 is asked for, else float32 (emulated bf16 is slower)."""
    device = device or quantization_device()
    if device.type != "cpu":
        return dtype
    if dtype in (torch.bfloat16, torch.float16):
        if cpu_has_native_bf16():
            return torch.bfloat16
        notice("QLoRA on this CPU: the 4-bit matmuls compute in float32 (it has no native bf16; "
               "ALPHADPO_CPU_BF16=1 forces bf16)")
    return torch.float32


_4BIT_CHECKED: set[tuple[str, str]] = set()


def check_4bit_support(device: torch.device, compute: torch.dtype) -> None:
    """Refuse QLoRA, saying why, only where bitsandbytes cannot quantise to 4-bit NF4 on `device`
    (a round trip of a small matrix is the test, so what works is never refused)."""
    key = (str(device), str(compute))
    if key in _4BIT_CHECKED:
        return
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:
        raise ConfigError(
            f"--mode qlora needs bitsandbytes, which cannot be imported here ({exc}). Install it "
            "(pip install bitsandbytes) or use --mode lora."
        ) from None
    try:
        w = torch.randn(64, 64, device=device, dtype=compute)
        q, state = bnb_f.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        back = bnb_f.dequantize_4bit(q, state)
        if back.shape != w.shape or not torch.isfinite(back).all():
            raise RuntimeError("the NF4 round trip returned wrong values")
    except Exception as exc:  # noqa: BLE001 - any failure means: no 4-bit here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"QLoRA cannot run on this machine: bitsandbytes {getattr(bnb, '__version__', '?')} has no working "
            f"4-bit NF4 kernels for {device.type} ({str(compute).replace('torch.', '')}): {first}. "
            "Use --mode lora, or a machine where bitsandbytes supports 4-bit weights (CUDA, or a CPU with "
            "bitsandbytes >= 0.46)."
        ) from None
    _4BIT_CHECKED.add(key)


def bnb_4bit_config(compute: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def is_4bit(model: torch.nn.Module) -> bool:
    """Whether `model` (possibly inside peft) holds bitsandbytes 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def keep_4bit_layout(model):
    """Switch off bitsandbytes' CPU inference repacking of 4-bit weights.

    On a CPU with AVX512-BF16, a `Linear4bit` called in eval mode without gradient rewrites its weight in
    place into a CPU-only layout, with the double-quantised absmax turned into bf16 (other numbers), and
    every later call, training ones included, goes through `gemv_4bit`, which has no autograd formula:
    the gradient into the layer's input is silently dropped ("an autograd kernel was not registered").
    The held-out evaluation before training and the reference passes would trigger it. Kept off, all
    passes compute with the same NF4 weights, and the backward is right.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def prepare_4bit(model):
    """peft's k-bit preparation: base frozen, its non-quantised weights (norms, embeddings, head) in
    float32. Applied alike to the policy, the reference-only copy and an evaluated run, so that all
    three compute the same numbers. Checkpointing is enabled separately
    (`models.checkpointing.enable_checkpointing`)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
