"""Attention that never crosses a segment of a packed row (see `alphadpo_cli.logps.layouts` for the layout).

Attention never crosses a segment. It is computed by `segment_attention`, registered with
transformers' `AttentionInterface` and selected by `install_segment_attention(model)`:

* CUDA: one `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 varlen) call per layer, the
  keys of each segment gathered as ``[prompt keys, own keys]`` with bottom-right causal alignment;
  or `flash_attn.flash_attn_varlen_func` when that package is installed and torch's op is not.
* elsewhere (CPU): one `scaled_dot_product_attention` per segment (``is_causal`` for plain segments,
  a small ``[L_q, L_prefix + L_q]`` lower-right causal mask for prefix-shared ones). The cost is the
  sum of the per-sequence attention costs: nothing is spent on a block-diagonal [T, T] mask.

When a forward carries no segment plan the function hands over to the model's original
implementation (sdpa, eager, ...), so padded calls (scoring, generation) behave exactly as before.

The per-sequence log-probs equal those of the padded path (tests/test_packing.py, 1e-5 in fp32).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

SEGMENT_KWARG = "alphadpo_segments"
_PREFIX = "alphadpo_segments_"


# ---------------------------------------------------------------------------------------------
# attention over segments


class SegmentPlan:
    """Per-forward attention plan, shared by every layer (and by the recomputation in backward)."""

    def __init__(self, segments: torch.Tensor | list, device: torch.device):
        segs = segments.tolist() if isinstance(segments, torch.Tensor) else [list(s) for s in segments]
        self.segments = [tuple(int(x) for x in s) for s in segs]
        self.device = torch.device(device)
        self._masks: dict[int, torch.Tensor] = {}
        self._varlen: tuple | None = None

    def __repr__(self) -> str:  # shows in error messages, keep it short
        return f"SegmentPlan({len(self.segments)} segments)"

    def prefix_mask(self, j: int) -> torch.Tensor:
        """[L_q, L_p + L_q] boolean: query i sees the whole prefix and own keys 0..i."""
        if j not in self._masks:
            qs, qe, ps, pe = self.segments[j]
            lq, lp = qe - qs, pe - ps
            self._masks[j] = torch.ones(lq, lp + lq, dtype=torch.bool, device=self.device).tril(diagonal=lp)
        return self._masks[j]

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


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def _varlen_fn():
    """A FlashAttention varlen kernel, or None: torch's own, else the flash_attn package's."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        def run(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), enable_gqa=True)

        return run
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        def run(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)

        return run
    except ImportError:
        return None


_VARLEN = None
USE_VARLEN = True  # tests switch it off to compare the two kernels


def _segment_attention_varlen(query, key, value, plan: SegmentPlan, scaling):
    global _VARLEN
    if _VARLEN is None:
        _VARLEN = _varlen_fn() or False
    k_index, cu_q, cu_k, max_q, max_k = plan.varlen()
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, k_index)  # [T_k, H_kv, D]
    v = value[0].transpose(0, 1).index_select(0, k_index)
    out = _VARLEN(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, scaling)
    return out.unsqueeze(0)  # [1, T, H, D]


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _segment_attention_sdpa(module, query, key, value, plan: SegmentPlan, scaling):
    groups = query.shape[1] // key.shape[1]
    # GQA without materialised copies of K/V (which SDPA would also keep for backward)
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
    outs = []
    for j, (qs, qe, ps, pe) in enumerate(plan.segments):
        q = query[:, :, qs:qe]
        if pe > ps:
            k = torch.cat([key[:, :, ps:pe], key[:, :, qs:qe]], dim=2)
            v = torch.cat([value[:, :, ps:pe], value[:, :, qs:qe]], dim=2)
            mask, causal = plan.prefix_mask(j), False
        else:
            k, v, mask, causal = key[:, :, qs:qe], value[:, :, qs:qe], None, True
        if not gqa:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, **gqa))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous()  # [1, T, H, D]


def make_segment_attention(base: Callable) -> Callable:
    """An `AttentionInterface` function: segment attention when the call carries a plan, else `base`."""

    def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        plan = kwargs.pop(SEGMENT_KWARG, None)
        if plan is None:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if query.shape[0] != 1:
            raise ValueError("segment attention expects one packed row")
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])
        if query.is_cuda and USE_VARLEN and query.dtype in (torch.float16, torch.bfloat16):
            global _VARLEN
            if _VARLEN is None:
                _VARLEN = _varlen_fn() or False
            if _VARLEN:
                return _segment_attention_varlen(query, key, value, plan, scaling), None
        return _segment_attention_sdpa(module, query, key, value, plan, scaling), None

    return segment_attention


def _configs(model) -> Iterable:
    seen = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            yield cfg


def install_segment_attention(model: torch.nn.Module) -> str:
    """Switch `model` (a transformers model, possibly inside peft) to segment-aware attention.

    Calls without a segment plan keep using the previous implementation, with its own masks.
    Returns the new implementation name. Idempotent.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = None
    for cfg in _configs(model):
        base = cfg._attn_implementation or "sdpa"
        if base.startswith(_PREFIX):
            name = base
            continue
        if base == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward as base_fn
        else:
            base_fn = ALL_ATTENTION_FUNCTIONS[base]
        name = _PREFIX + base
        AttentionInterface.register(name, make_segment_attention(base_fn))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        AttentionMaskInterface.register(name, mask_fn)
        # Set on the config directly: `set_attn_implementation` validates against the built-in list.
        cfg._attn_implementation = name
    if name is None:
        raise ValueError("install_segment_attention: no transformers config with an attention implementation found")
    return name


def uses_segment_attention(model: torch.nn.Module) -> bool:
    return any(str(cfg._attn_implementation).startswith(_PREFIX) for cfg in _configs(model))


