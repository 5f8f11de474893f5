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
import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

SEGMENT_KWARG = "alphadpo_segments"
# The name registered with transformers' AttentionInterface. It contains none of "sdpa", "flash",
# "flex", "paged": transformers picks code paths by substrings of the implementation name.
SEGMENT_IMPL = "alphadpo_segment_attention"

# Keywords an attention call may carry that do not change what attention computes.
_IGNORED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "past_key_values"})


# ---------------------------------------------------------------------------------------------
# the plan of one packed forward


class SegmentPlan:
    """Per-forward attention plan, shared by every layer (and by the recomputation in backward).

    `segments`: (q_start, q_end, prefix_start, prefix_end) per segment; `position_ids`: the row's
    position ids ([T] or [1, T]); without them the layout's convention is assumed (a plain segment
    from 0, a prefix from 0 and its segment continuing after it).
    """

    def __init__(self, segments: torch.Tensor | list, device: torch.device, position_ids=None):
        segs = segments.tolist() if isinstance(segments, torch.Tensor) else [list(s) for s in segments]
        self.segments = [tuple(int(x) for x in s) for s in segs]
        self.device = torch.device(device)
        self._position_ids = position_ids  # read (one host copy) only when a window or the varlen check needs it
        self._positions: list[int] | None = None
        self._masks: dict[tuple, torch.Tensor | None] = {}
        self._varlen: tuple | None = None
        self._contiguous: bool | None = None
        self._configs: dict[int, tuple] = {}
        self.calls = 0  # attention calls that reached the kernel
        self.unsupported: dict[str, str] = {}  # keyword -> value (repr) the kernel does not implement

    def __repr__(self) -> str:  # shows in error messages, keep it short
        return f"SegmentPlan({len(self.segments)} segments)"

    # -- positions and masks --

    def _segment_positions(self, j: int) -> tuple[list[int], list[int]]:
        """(query positions, key positions) of segment j; keys are [prefix, own]."""
        qs, qe, ps, pe = self.segments[j]
        if self._positions is None and self._position_ids is not None:
            pos = self._position_ids
            pos = pos.reshape(-1).tolist() if isinstance(pos, torch.Tensor) else [int(p) for p in pos]
            self._positions = pos
        if self._positions is not None:
            own, prefix = self._positions[qs:qe], self._positions[ps:pe]
        else:
            prefix = list(range(pe - ps))
            own = list(range(pe - ps, pe - ps + qe - qs))
        return own, prefix + own

    def contiguous(self) -> bool:
        """Whether in every segment the key index distance equals the position distance (the keys'
        positions run by one from the first prefix key to the last own key): then the varlen kernels'
        index-based window is the position-based one."""
        if self._contiguous is None:
            ok = True
            for j in range(len(self.segments)):
                _, kpos = self._segment_positions(j)
                if any(b - a != 1 for a, b in zip(kpos, kpos[1:])):
                    ok = False
                    break
            self._contiguous = ok
        return self._contiguous

    def mask(self, j: int, window: int | None) -> torch.Tensor | None:
        """[L_q, L_prefix + L_q] boolean mask of segment j (True: attend): every prefix key, own keys up to
        the query, and with a `window` only keys at positions > query position - window. None for a plain
        segment the window does not cut (plain causal)."""
        key = (j, window)
        if key not in self._masks:
            qs, qe, ps, pe = self.segments[j]
            lq, lp = qe - qs, pe - ps
            cut = False
            if window and lq > 0:
                qpos, kpos = self._segment_positions(j)
                cut = max(qpos) - min(kpos) >= window
            if lp == 0 and not cut:
                self._masks[key] = None
            else:
                m = torch.ones(lq, lp + lq, dtype=torch.bool).tril(diagonal=lp)
                if cut:
                    q = torch.tensor(qpos, dtype=torch.long)[:, None]
                    k = torch.tensor(kpos, dtype=torch.long)[None, :]
                    m &= k > q - window
                self._masks[key] = m.to(self.device)
        return self._masks[key]

    def varlen(self):
        """(key gather index, cu_seq_q, cu_seq_k, max_q, max_k) for one varlen call."""
        if self._varlen is None:
            k_index, cu_q, cu_k = [], [0], [0]
            max_q = max_k = 0
            for qs, qe, ps, pe in self.segments:
                k_index.extend(range(ps, pe))
                k_index.extend(range(qs, qe))
                cu_q.append(cu_q[-1] + qe - qs)
                cu_k.append(cu_k[-1] + (pe - ps) + (qe - qs))
                max_q, max_k = max(max_q, qe - qs), max(max_k, (pe - ps) + (qe - qs))
            dev = self.device
            self._varlen = (
                torch.tensor(k_index, dtype=torch.long, device=dev),
                torch.tensor(cu_q, dtype=torch.int32, device=dev),
                torch.tensor(cu_k, dtype=torch.int32, device=dev),
                max_q, max_k,
            )
        return self._varlen

    # -- routing --

    def config_for(self, config):
        """A copy of `config` (made once per plan, through the public `from_dict`) whose attention
        implementation is the segment kernel."""
        entry = self._configs.get(id(config))
        if entry is None or entry[0] is not config:
            twin = type(config).from_dict(config.to_dict(), attn_implementation=SEGMENT_IMPL)
            entry = self._configs[id(config)] = (config, twin)
        return entry[1]

    def problem(self) -> str | None:
        """Why this forward's result must not be used (None: every attention call was served as defined)."""
        if self.unsupported:
            found = ", ".join(f"{k}={v}" for k, v in sorted(self.unsupported.items()))
            return f"its attention passes {found}, which the packed kernels do not implement"
        if self.calls == 0:
            return ("its attention never reached the segment kernel (it does not dispatch through "
                    "transformers' AttentionInterface by its config)")
        return None


# ---------------------------------------------------------------------------------------------
# kernels


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


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


def _segment_attention_varlen(kernel: VarlenKernel, query, key, value, plan: SegmentPlan, scaling, *,
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


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _explicit(q, k, v, mask, scaling, softcap, dropout, training):
    """softmax(softcap(q kᵀ · scaling) + mask) v, in the order of the models' eager attention."""
    lq, lk = q.shape[2], k.shape[2]
    w = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap:
        w = torch.tanh(w / softcap) * softcap
    if mask is None:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=dropout, training=training)
    return torch.matmul(w, v)


def _segment_attention_sdpa(module, query, key, value, plan: SegmentPlan, scaling, *, softcap=None,
                            window=None, dropout: float = 0.0):
    """Per segment: SDPA, or the explicit product when there is a soft-cap."""
    groups = query.shape[1] // key.shape[1]
    # GQA without materialised copies of K/V (which SDPA would also keep for backward)
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_GQA and not softcap else {}
    training = bool(getattr(module, "training", False))
    outs = []
    for j, (qs, qe, ps, pe) in enumerate(plan.segments):
        q = query[:, :, qs:qe]
        if pe > ps:
            k = torch.cat([key[:, :, ps:pe], key[:, :, qs:qe]], dim=2)
            v = torch.cat([value[:, :, ps:pe], value[:, :, qs:qe]], dim=2)
        else:
            k, v = key[:, :, qs:qe], value[:, :, qs:qe]
        mask = plan.mask(j, window)
        if not gqa:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if softcap:
            outs.append(_explicit(q, k, v, mask, scaling, softcap, dropout, training))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                       dropout_p=dropout, scale=scaling, **gqa))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous()  # [1, T, H, D]


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
        out = _segment_attention_varlen(kernel, query, key, value, plan, scaling, softcap=softcap, window=window,
                                        dropout=dropout)
    else:
        out = _segment_attention_sdpa(module, query, key, value, plan, scaling, softcap=softcap, window=window,
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
