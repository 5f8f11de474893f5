"""Packed attention through one FlashAttention varlen call per layer (CUDA, bf16/fp16): the kernels
found here, which one fits a layer's call, and the call itself (see `alphadpo_cli.kernels.segment_attention`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .segment_plan import SegmentPlan


@dataclass(frozen=True)
class VarlenKernel:
    """A FlashAttention varlen function and what it implements. `kind`: "torch"
    (`torch.nn.attention.varlen.varlen_attn`'s signature) or "flash_attn" (`flash_attn_varlen_func`'s)."""

    kind: str
    fn: Callable
    softcap: bool
    dropout: bool


def _find_varlen_kernels() -> tuple[VarlenKernel, ...]:
    found = []
    try:
        from torch.nn.attention.varlen import varlen_attn

        found.append(VarlenKernel("torch", varlen_attn, softcap=False, dropout=False))
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        params = inspect.signature(flash_attn_varlen_func).parameters  # softcap: flash-attn >= 2.6
        found.append(VarlenKernel("flash_attn", flash_attn_varlen_func, softcap="softcap" in params, dropout=True))
    except ImportError:
        pass
    return tuple(found)


_VARLEN: tuple[VarlenKernel, ...] | None = None  # resolved on first use; tests put stand-ins here
# None: the varlen kernels on CUDA for bf16/fp16 only; True: wherever `_VARLEN` has one that fits (tests
# run stand-ins on CPU); False: never.
USE_VARLEN: bool | None = None
_HALF = (torch.float16, torch.bfloat16)


def varlen_kernels() -> tuple[VarlenKernel, ...]:
    global _VARLEN
    if _VARLEN is None:
        _VARLEN = _find_varlen_kernels()
    return _VARLEN


def pick_varlen(device: torch.device, dtype: torch.dtype, *, softcap=None, dropout: float = 0.0,
                window=None, plan: SegmentPlan | None = None) -> VarlenKernel | None:
    """The varlen kernel packed attention uses for these inputs, or None for the per-segment path."""
    if USE_VARLEN is False or (USE_VARLEN is None and not (torch.device(device).type == "cuda" and dtype in _HALF)):
        return None
    if window and plan is not None and not plan.contiguous():
        return None
    for k in varlen_kernels():
        if (not softcap or k.softcap) and (not dropout or k.dropout):
            return k
    return None


def describe_packed_kernel(device, dtype, *, softcap=None, window=None) -> str:
    """In words: which kernel packed attention runs for this device and dtype."""
    k = pick_varlen(torch.device(device), dtype, softcap=softcap, window=window)
    if k is not None:
        return f"FlashAttention varlen ({'torch varlen_attn' if k.kind == 'torch' else 'flash_attn_varlen_func'})"
    return "per-segment explicit (soft-capped)" if softcap else "per-segment sdpa"


def segment_attention_varlen(kernel: VarlenKernel, query, key, value, plan: SegmentPlan, scaling, *,
                             softcap=None, window=None, dropout: float = 0.0):
    k_index, cu_q, cu_k, max_q, max_k = plan.varlen()
    q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, k_index).contiguous()  # [T_k, H_kv, D]
    v = value[0].transpose(0, 1).index_select(0, k_index).contiguous()
    # transformers: keys at positions > p - window; FlashAttention: keys i + Lk - Lq - left .. i + Lk - Lq
    left = int(window) - 1 if window else -1
    if kernel.kind == "torch":
        out = kernel.fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(left, 0), enable_gqa=True)
    else:
        extra = {"softcap": float(softcap)} if softcap else {}
        out = kernel.fn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=float(dropout), softmax_scale=scaling,
                        causal=True, window_size=(left, 0) if window else (-1, -1), **extra)
    return out.unsqueeze(0)  # [1, T, H, D]
