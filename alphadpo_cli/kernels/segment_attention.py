"""Attention that never crosses a segment of a packed row (see `alphadpo_cli.logps.layouts` for the layout).

A packed forward passes a `SegmentPlan` to the decoder as the keyword argument ``alphadpo_segments``.
`install_segment_attention(model)` puts forward hooks on the model's modules: while a module call carries
a plan, the module's ``config`` is swapped for a copy of it (cached on the plan) whose attention
implementation is this module's kernel, registered with transformers' public `AttentionInterface`, and
swapped back when the call returns (or raises). Nothing else changes: the model's own config is never
touched, a call without a plan runs exactly the model's code, and the recompute of an activation-
checkpointed layer (the same call, with the same plan) runs the same kernel again.
`uninstall_segment_attention` removes the hooks; `segment_attention_installed(model)` does both around a
block.

The kernel computes, for every segment, what the model's own attention computes for that sequence:

* the module's ``scaling``, its ``softcap`` (Gemma-2's ``attn_logit_softcapping``:
  ``tanh(s / cap) * cap`` on the scaled scores, before the mask), its ``sliding_window`` (transformers'
  rule, `masking_utils.sliding_window_overlay`: a query at position p sees keys at positions
  k > p - window, i.e. the last ``window`` positions including its own; in a prefix-shared segment the
  distances are those of the position ids), its ``dropout`` (the probability the module passes: 0 outside
  training), causal within the segment, every prefix key visible;
* CUDA, bf16/fp16: one FlashAttention varlen call per layer, the keys of each segment gathered as
  ``[prefix keys, own keys]`` with bottom-right causal alignment: `torch.nn.attention.varlen.varlen_attn`
  (``window_size=(window - 1, 0)``; it has no soft-cap and no dropout) or `flash_attn.flash_attn_varlen_func`
  (``causal=True, window_size=(window - 1, 0), softcap=cap, dropout_p``), whichever supports what the
  layer asks for; else the per-segment path below;
* elsewhere: per segment, `scaled_dot_product_attention` (``is_causal`` for plain segments, a small
  ``[L_q, L_prefix + L_q]`` boolean mask for prefix-shared or windowed ones), or with a soft-cap (SDPA
  has none) the explicit product ``softmax(softcap(q kᵀ · scaling) + mask) v`` in the order of the
  model's eager attention, the softmax in float32. The cost is the sum of the per-sequence costs.

An attention call with a keyword the kernel does not implement (anything but the above, position ids,
cache flags and unset ``None`` values), or a non-causal module, is never computed silently otherwise:
the kernel records it on the plan and returns zeros, and the caller (`SequenceLogps`) discards that
forward, marks the model (`mark_packed_fallback`) and computes this and every later packed batch of it
through the model's own padded forward, with one notice. A model whose attention never reaches the
kernel (it does not dispatch through ``config``'s attention implementation) is caught the same way
(`SegmentPlan.problem`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Iterator

import torch

from .segment_plan import SEGMENT_IMPL, SEGMENT_KWARG, SegmentPlan
from .segment_sdpa import segment_attention_sdpa
from .segment_varlen import VarlenKernel, describe_packed_kernel, pick_varlen, segment_attention_varlen, varlen_kernels

# The kernel choice (`USE_VARLEN`, the found kernels `_VARLEN`) lives in `segment_varlen`; these names keep
# their old import path (`_segment_attention_*`: tests call the two paths directly).
_segment_attention_sdpa = segment_attention_sdpa
_segment_attention_varlen = segment_attention_varlen
__all__ = ["SEGMENT_IMPL", "SEGMENT_KWARG", "SegmentPlan", "VarlenKernel", "describe_packed_kernel", "pick_varlen",
           "varlen_kernels", "segment_attention", "install_segment_attention", "uninstall_segment_attention",
           "segment_attention_installed", "uses_segment_attention", "packed_fallback_reason", "mark_packed_fallback"]

# Keywords an attention call may carry that do not change what attention computes.
_IGNORED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "past_key_values"})


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window=None, softcap=None, **kwargs):
    """The `AttentionInterface` function of packed rows (attention_mask is ignored: the plan is the mask)."""
    plan = kwargs.pop(SEGMENT_KWARG, None)
    if not isinstance(plan, SegmentPlan):
        raise RuntimeError("segment attention was called without a segment plan")
    plan.calls += 1
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    for name, val in kwargs.items():
        if name not in _IGNORED_KWARGS and val is not None:
            plan.unsupported[name] = type(val).__name__ if isinstance(val, torch.Tensor) else repr(val)
    if not is_causal:
        plan.unsupported["is_causal"] = "False"
    if query.shape[0] != 1:
        raise ValueError("segment attention expects one packed row")
    if plan.unsupported:  # the caller discards this forward and runs the batch padded
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    softcap = float(softcap) if softcap else None
    window = int(sliding_window) if sliding_window else None
    dropout = float(dropout or 0.0)
    kernel = pick_varlen(query.device, query.dtype, softcap=softcap, dropout=dropout, window=window, plan=plan)
    if kernel is not None:
        out = segment_attention_varlen(kernel, query, key, value, plan, scaling, softcap=softcap, window=window,
                                       dropout=dropout)
    else:
        out = segment_attention_sdpa(module, query, key, value, plan, scaling, softcap=softcap, window=window,
                                     dropout=dropout)
    return out, None


# ---------------------------------------------------------------------------------------------
# installing


_REGISTERED = False
# every transformers model (PreTrainedModel) inside an installed network -> its installation
_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, _Installation]" = weakref.WeakKeyDictionary()
# model -> why its packed batches run padded
_FALLBACK: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(SEGMENT_IMPL, segment_attention)
        _REGISTERED = True


class _Installation:
    """The hooks of one installed network: a module call that carries a plan runs with the plan's copy
    of the module's config (the segment kernel as its attention implementation)."""

    def __init__(self, model: torch.nn.Module):
        from transformers import PreTrainedConfig, PreTrainedModel

        self.models = _transformers_models(model)
        self.handles = []
        self._saved: dict[int, list] = {}
        seen: set[int] = set()
        for m in (sub for top in self.models for sub in top.modules()):
            if id(m) in seen or isinstance(m, PreTrainedModel):
                continue
            seen.add(id(m))
            if not isinstance(getattr(m, "config", None), PreTrainedConfig):
                continue
            self.handles.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._leave, with_kwargs=True, always_call=True))

    def _enter(self, module, args, kwargs):
        plan = kwargs.get(SEGMENT_KWARG)
        if isinstance(plan, SegmentPlan):
            original = module.config
            self._saved.setdefault(id(module), []).append(original)
            module.config = plan.config_for(original)

    def _leave(self, module, args, kwargs, output):
        stack = self._saved.get(id(module))
        if stack and isinstance(kwargs.get(SEGMENT_KWARG), SegmentPlan):
            module.config = stack.pop()
            if not stack:
                del self._saved[id(module)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _transformers_models(model: torch.nn.Module) -> list:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def install_segment_attention(model: torch.nn.Module) -> str:
    """Let `model` (a transformers model, possibly inside peft) run packed forwards: calls that carry a
    segment plan use the segment kernel, every other call is untouched (the model's config, its
    attention implementation and its masks stay as they are). Idempotent; returns the kernel's
    registered name. Undo with `uninstall_segment_attention`."""
    models = _transformers_models(model)
    if not models:
        raise ValueError("install_segment_attention: no transformers model found")
    if all(m in _INSTALLED for m in models):
        return SEGMENT_IMPL
    uninstall_segment_attention(model)  # a part installed before: one set of hooks over the whole
    _register()
    inst = _Installation(model)
    if not inst.handles:
        inst.remove()
        raise ValueError("install_segment_attention: no module of the model holds a transformers config")
    for m in inst.models:
        _INSTALLED[m] = inst
    return SEGMENT_IMPL


def uninstall_segment_attention(model: torch.nn.Module) -> None:
    """Remove what `install_segment_attention` added (nothing if it was not installed)."""
    for m in _transformers_models(model):
        inst = _INSTALLED.pop(m, None)
        if inst is not None:
            inst.remove()


@contextlib.contextmanager
def segment_attention_installed(model: torch.nn.Module) -> Iterator[str]:
    """Installed for the block; removed after it unless it was installed before."""
    before = uses_segment_attention(model)
    name = install_segment_attention(model)
    try:
        yield name
    finally:
        if not before:
            uninstall_segment_attention(model)


def uses_segment_attention(model: torch.nn.Module) -> bool:
    """Whether packed forwards of `model` (or of a model inside it) can run: it is installed."""
    return any(m in _INSTALLED for m in _transformers_models(model))


def packed_fallback_reason(model: torch.nn.Module) -> str | None:
    """Why the packed batches of `model` run through its padded forward (None: they run packed)."""
    for m in _transformers_models(model):
        if m in _FALLBACK:
            return _FALLBACK[m]
    return None


def mark_packed_fallback(model: torch.nn.Module, reason: str) -> None:
    """From now on the packed batches of `model` run through its padded forward."""
    for m in _transformers_models(model):
        _FALLBACK[m] = reason
