"""What every loading path shares: quiet libraries, the dtype and device, one-time notices, the attention
implementation to load a model with."""

from __future__ import annotations

import logging
import os
import warnings

import torch

from ..hardware import cpu_has_native_bf16

TINY = "tiny-random"
TIED_ADAPTER_WARNING = r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"


def quiet_libraries() -> None:
    """Silence import-time chatter that would bury our own messages."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else deepspeed warns on import
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    # Deprecation notices from inside transformers/peft are for us, not for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # peft's warning for an adapter on a tied embedding or head (e.g. lora.target_modules [q_proj, lm_head] on
    # SmolLM2): `merged_model` unties them (models.merging), and its remedy, `ensure_weight_tying`, would put a
    # second adapter on the input embedding (other training) and in peft 0.21 merges both deltas into the one
    # shared weight.
    warnings.filterwarnings("ignore", category=UserWarning, message=TIED_ADAPTER_WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def resolve_dtype(name: str) -> torch.dtype:
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_NOTICES: set[str] = set()


def notice(message: str) -> None:
    """Print `message` on stderr once per process (and only on the main process of a launched job)."""
    if message in _NOTICES:
        return
    _NOTICES.add(message)
    if os.environ.get("RANK", "0") not in ("", "0"):
        return
    from ..console import notice as show

    show(message)


FLASH_ATTENTION = {"flash_attention_2": ("flash_attn", "is_flash_attn_2_available"),
                   "flash_attention_3": ("flash_attn_3", "is_flash_attn_3_available")}


def resolve_attn_implementation(requested: str | None, dtype: torch.dtype | None = None) -> str | None:
    """The attention implementation to load the model with: `requested`, except FlashAttention where it
    cannot run (no CUDA GPU, the flash-attn package missing, float32 weights), which falls back to
    PyTorch's SDPA with one notice. Packed batches use alphadpo's segment attention either way."""
    if requested not in FLASH_ATTENTION:
        return requested
    package, probe = FLASH_ATTENTION[requested]
    if not torch.cuda.is_available():
        reason = "there is no CUDA GPU here"
    elif dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        reason = f"FlashAttention computes in bf16/fp16, not {str(dtype).replace('torch.', '')}"
    else:
        import transformers.utils as hf_utils

        reason = None if getattr(hf_utils, probe, lambda: False)() else f"the {package} package is not installed"
    if reason is None:
        return requested
    notice(f"model.attn_implementation={requested}: {reason}; using sdpa (PyTorch scaled-dot-product attention) "
           "instead. Packed training batches use alphadpo's own segment attention either way.")
    return "sdpa"
