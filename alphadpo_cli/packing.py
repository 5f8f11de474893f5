"""Padding-free packing and prefix sharing for the preference forward pass.

A micro-batch of B pairs becomes ONE row of tokens with no padding:

* packing without prefix sharing: ``[prompt_1 chosen_1][prompt_1 rejected_1][prompt_2 chosen_2]...``,
  position ids restarting at 0 for every sequence;
* prefix sharing (the default): ``[prompt_1 chosen_1][rejected_1][prompt_2 chosen_2][rejected_2]...``:
  the prompt is computed once per pair. Rejected tokens attend to their pair's prompt and to
  themselves (never to the chosen response), and their position ids continue from the prompt's end,
  so every rejected token sees exactly the context it has in the padded layout.

The last token of every sequence is left out of the row: its output would predict nothing, and under
causal attention no other token looks at it.

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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

SEGMENT_KWARG = "alphadpo_segments"
_PREFIX = "alphadpo_segments_"

# Keys of a packed batch that `SequenceLogps.forward` takes (besides `input_ids`).
PACKED_KEYS = ("position_ids", "segments", "target_index", "target_labels", "target_seq", "num_sequences")


# ---------------------------------------------------------------------------------------------
# layout


@dataclass
class PackedLayout:
    """The packed row of a list of pairs, as plain Python lists (cheap to build, easy to test)."""

    input_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    # (q_start, q_end, prefix_start, prefix_end): queries row[q_start:q_end] attend causally to
    # row[prefix_start:prefix_end] followed by themselves. An empty prefix is (0, 0).
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)
    target_index: list[int] = field(default_factory=list)  # row position whose output predicts...
    target_labels: list[int] = field(default_factory=list)  # ...this token
    target_seq: list[int] = field(default_factory=list)  # of this sequence: chosen i -> i, rejected i -> B + i
    num_sequences: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def packed_length(prompt_len: int, chosen_len: int, rejected_len: int, prefix_sharing: bool = True) -> int:
    """Tokens a pair occupies in a packed row (the last token of each sequence is not fed)."""
    if prefix_sharing:
        return prompt_len + max(chosen_len - 1, 0) + max(rejected_len - 1, 0)
    return 2 * prompt_len + max(chosen_len - 1, 0) + max(rejected_len - 1, 0)


def padded_length(prompt_len: int, chosen_len: int, rejected_len: int) -> int:
    """Tokens a pair occupies in the padded layout before batch padding (2 rows)."""
    return 2 * prompt_len + chosen_len + rejected_len


def build_layout(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], prefix_sharing: bool = True) -> PackedLayout:
    """Pack (prompt_ids, chosen_ids, rejected_ids) pairs into one row."""
    out = PackedLayout(num_sequences=2 * len(pairs))
    b = len(pairs)

    def add_tokens(ids: Sequence[int], first_pos: int) -> tuple[int, int]:
        start = len(out.input_ids)
        out.input_ids.extend(int(t) for t in ids)
        out.position_ids.extend(range(first_pos, first_pos + len(ids)))
        return start, len(out.input_ids)

    for i, (prompt, chosen, rejected) in enumerate(pairs):
        prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
        P = len(prompt)
        # chosen sequence (prompt + chosen minus its last token), positions from 0
        s, e = add_tokens(prompt + chosen[:-1], 0)
        if e > s:
            out.segments.append((s, e, 0, 0))
        for k, tok in enumerate(chosen):
            pos = P + k  # position of the predicted token in its sequence
            if pos >= 1:
                out.target_index.append(s + pos - 1)
                out.target_labels.append(tok)
                out.target_seq.append(i)
        last_prompt = s + P - 1  # row position of the prompt's last token (-1 when P == 0)
        if prefix_sharing and P > 0:
            rs, re_ = add_tokens(rejected[:-1], P)
            if re_ > rs:
                out.segments.append((rs, re_, s, s + P))
            for k, tok in enumerate(rejected):
                out.target_index.append(last_prompt if k == 0 else rs + k - 1)
                out.target_labels.append(tok)
                out.target_seq.append(b + i)
        else:
            rs, re_ = add_tokens(prompt + rejected[:-1], 0)
            if re_ > rs:
                out.segments.append((rs, re_, 0, 0))
            for k, tok in enumerate(rejected):
                pos = P + k
                if pos >= 1:
                    out.target_index.append(rs + pos - 1)
                    out.target_labels.append(tok)
                    out.target_seq.append(b + i)
    return out


def layout_to_batch(layout: PackedLayout) -> dict:
    """Tensors for `SequenceLogps.forward` (a [1, T] row)."""
    return {
        "input_ids": torch.tensor([layout.input_ids], dtype=torch.long),
        "position_ids": torch.tensor([layout.position_ids], dtype=torch.long),
        "segments": torch.tensor(layout.segments, dtype=torch.long).reshape(-1, 4),
        "target_index": torch.tensor(layout.target_index, dtype=torch.long),
        "target_labels": torch.tensor(layout.target_labels, dtype=torch.long),
        "target_seq": torch.tensor(layout.target_seq, dtype=torch.long),
        "num_sequences": layout.num_sequences,
        "num_tokens": len(layout.input_ids),
    }


class PackedPairCollator:
    """Drop-in for `data.PairCollator` producing one packed, padding-free row per micro-batch.

    Outputs: input_ids/position_ids [1, T], segments [S, 4], target_index/labels/seq [N],
    num_sequences (2B), num_tokens (T) and index [B] (each pair's row in the tokenised split).
    """

    def __init__(self, pad_token_id: int | None = None, prefix_sharing: bool = True):
        self.pad = pad_token_id  # unused: nothing is padded; kept for the PairCollator signature
        self.prefix_sharing = prefix_sharing

    def __call__(self, examples: list[dict]) -> dict:
        layout = build_layout(
            [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in examples], self.prefix_sharing
        )
        batch = layout_to_batch(layout)
        batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        return batch


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_pairs: int | None = None) -> list[list[int]]:
    """Group items (longest first) into batches whose summed length stays within `token_budget`.

    An item longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        if cur and (used + lengths[i] > token_budget or (max_pairs and len(cur) >= max_pairs)):
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        batches.append(cur)
    return batches


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

    @property
    def has_prefix(self) -> bool:
        return any(pe > ps for _, _, ps, pe in self.segments)


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


# ---------------------------------------------------------------------------------------------
# reference precompute: packed, batched by token budget


@torch.no_grad()
def compute_reference_packed(
    network: torch.nn.Module,
    split,
    *,
    token_budget: int = 8192,
    prefix_sharing: bool = True,
    chunk_size: int | None = None,
    device=None,
    progress=None,
):
    """Reference log-probs of a split (as `reference.compute_reference`), packed and batched by tokens.

    Without gradients nothing is stored for backward, so one row can hold many pairs: the budget
    bounds the activations of one layer ([T, hidden] and [T, intermediate]).
    """
    from .logprobs import SequenceLogps
    from .reference import ReferenceLogps, scatter_pair_scores

    device = device or next(network.parameters()).device
    install_segment_attention(network)
    scorer = SequenceLogps(network, chunk_size=chunk_size or None)
    ds = split.dataset
    prompts, chosens, rejecteds = ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]
    n = len(prompts)
    lengths = [packed_length(len(p), len(c), len(r), prefix_sharing) for p, c, r in zip(prompts, chosens, rejecteds)]
    out = {k: torch.zeros(n, dtype=torch.float64) for k in ("chosen_sum", "rejected_sum", "chosen_count", "rejected_count")}
    done = 0
    for idx in token_budget_batches(lengths, token_budget):
        layout = build_layout([(prompts[i], chosens[i], rejecteds[i]) for i in idx], prefix_sharing)
        batch = layout_to_batch(layout)
        sums, counts = scorer(**{k: _to(v, device) for k, v in batch.items() if k in ("input_ids",) + PACKED_KEYS})
        scatter_pair_scores(out, idx, sums, counts)
        done += len(idx)
        if progress is not None:
            progress(done, n)
    return ReferenceLogps(**out)


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


# ---------------------------------------------------------------------------------------------
# CPU memory


def tune_cpu_allocator(mmap_threshold: int = 2 << 20, trim_threshold: int = 1 << 20) -> bool:
    """Make glibc return large freed tensors to the OS (Linux; no effect elsewhere).

    glibc raises its mmap threshold every time a large block is freed, after which activations
    come from the heap and stay resident once freed: the RSS of a training loop climbs to a
    fragmented high-water mark well above what is live (SmolLM2 LoRA, 2 pairs of ~330 tokens:
    5.0 GB peak RSS instead of 2.9). A fixed threshold keeps blocks above it in their own
    mappings, released on free. The price is page faults on fresh memory: 2 MB keeps the small
    temporaries on the reused heap (~15% slower step here; 256 KB: 2.9 GB but ~40% slower).
    Returns whether it was applied.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
