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


def _boundaries(plan: SegmentPlan, t: int) -> list[int]:
    """Every start and end of the plan's segments and prefixes in a row of `t` positions, 0 and `t` included."""
    return sorted({0, t, *(b for seg in plan.segments for b in seg if 0 <= b <= t)})


def _pieces(x: torch.Tensor, bounds: list[int]):
    """x [B, H, T, D] split along T at `bounds`; returns `span(a, b)`, positions a..b-1 for two of
    the bounds (one piece, or several concatenated)."""
    pieces = x.split([b - a for a, b in zip(bounds, bounds[1:])], dim=2)
    at = {b: i for i, b in enumerate(bounds)}

    def span(a: int, b: int) -> torch.Tensor:
        i, j = at[a], at[b]
        if j == i:
            return x[:, :, a:b]
        return pieces[i] if j == i + 1 else torch.cat(pieces[i:j], dim=2)

    return span


def segment_attention_sdpa(module, query, key, value, plan: SegmentPlan, scaling, *, softcap=None,
                           window=None, dropout: float = 0.0):
    """Per segment: SDPA, or the explicit product when there is a soft-cap."""
    groups = query.shape[1] // key.shape[1]
    # GQA without materialised copies of K/V (which SDPA would also keep for backward)
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_GQA and not softcap else {}
    training = bool(getattr(module, "training", False))
    # The row split once per tensor at every segment boundary: the backward of one split is one
    # concatenation of the pieces' gradients, where a slice per segment would write its gradient
    # into a zero-filled copy of the whole tensor and sum them (16 segments: 16 full-size zero fills
    # and additions per tensor and layer: 4-5% of the demo's fp32 CPU training step, measured).
    bounds = _boundaries(plan, query.shape[2])
    q_at, k_at, v_at = _pieces(query, bounds), _pieces(key, bounds), _pieces(value, bounds)
    outs = []
    for j, (qs, qe, ps, pe) in enumerate(plan.segments):
        q = q_at(qs, qe)
        if pe > ps:
            k = torch.cat([k_at(ps, pe), k_at(qs, qe)], dim=2)
            v = torch.cat([v_at(ps, pe), v_at(qs, qe)], dim=2)
        else:
            k, v = k_at(qs, qe), v_at(qs, qe)
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
