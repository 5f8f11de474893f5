"""Packed attention segment by segment: PyTorch's SDPA, or with a soft-cap (SDPA has none) the explicit
product in the order of the models' eager attention (see `alphadpo_cli.kernels.segment_attention`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segment_plan import SegmentPlan


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


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


def segment_attention_sdpa(module, query, key, value, plan: SegmentPlan, scaling, *, softcap=None,
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
