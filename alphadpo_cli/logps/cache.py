"""Reference log-probabilities: computed once before training and cached on disk.

The cache key covers the reference weights, the tokenised data (whose fingerprint includes the
tokenizer and every tokenisation setting) and the dtype, so any change misses the cache. Sums and
token counts are both stored, so averaged and summed methods read the same file. A file whose
checksum does not match is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.segment_attention import install_segment_attention
from .layouts import PACKED_KEYS, PairCollator, build_layout, layout_to_batch, packed_length, token_budget_batches
from ..data import TokenizedSplit
from ..io import atomic_dir, cache_home
from ..integrity import seal_dir, verify_dir
from .sequence import SequenceLogps

CACHE_VERSION = "1"


@dataclass
class ReferenceLogps:
    """Per-pair reference sums and counts, indexed by position in the tokenised split."""

    chosen_sum: torch.Tensor  # [N] float64
    rejected_sum: torch.Tensor
    chosen_count: torch.Tensor  # [N] float64
    rejected_count: torch.Tensor
    key: str = ""
    cache_hit: bool = False

    def take(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.cpu()
        return self.chosen_sum[index].to(device), self.rejected_sum[index].to(device)

    def __len__(self) -> int:
        return int(self.chosen_sum.shape[0])


def cache_key(model_fingerprint: str, split: TokenizedSplit, dtype: torch.dtype) -> str:
    raw = json.dumps([CACHE_VERSION, model_fingerprint, split.fingerprint, len(split), str(dtype)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_home() / "reference" / key


def load_cached(key: str, expected_rows: int) -> ReferenceLogps | None:
    path = cache_path(key)
    if not (path / "meta.json").is_file() or not verify_dir(path):
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(path / "logps.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("key") != key or int(tensors["chosen_sum"].shape[0]) != expected_rows:
        return None
    return ReferenceLogps(**tensors, key=key, cache_hit=True)


def save_cached(ref: ReferenceLogps, meta: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(cache_path(ref.key)) as tmp:
        save_file(
            {k: getattr(ref, k).contiguous() for k in ("chosen_sum", "rejected_sum", "chosen_count", "rejected_count")},
            str(tmp / "logps.safetensors"),
        )
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": ref.key}, indent=2, default=str))
        seal_dir(tmp)


def scatter_pair_scores(out: dict, idx: list[int], sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Store one batch's scores (chosen rows then rejected rows) at the pairs' positions."""
    b = len(idx)
    ix = torch.tensor(idx)
    out["chosen_sum"][ix] = sums[:b].double().cpu()
    out["rejected_sum"][ix] = sums[b:].double().cpu()
    out["chosen_count"][ix] = counts[:b].double().cpu()
    out["rejected_count"][ix] = counts[b:].double().cpu()


@torch.no_grad()
def compute_reference(
    network: torch.nn.Module,
    split: TokenizedSplit,
    pad_token_id: int,
    *,
    batch_size: int = 8,
    device=None,
    progress=None,
) -> ReferenceLogps:
    """One pass of the reference over a split (any order-independent batching is fine)."""
    device = device or next(network.parameters()).device
    scorer = SequenceLogps(network)
    collate = PairCollator(pad_token_id)
    n = len(split)
    out = {k: torch.zeros(n, dtype=torch.float64) for k in ("chosen_sum", "rejected_sum", "chosen_count", "rejected_count")}
    # Longest first: the batches of similar length waste less padding.
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(
        split.dataset["prompt_ids"], split.dataset["chosen_ids"], split.dataset["rejected_ids"])]
    order = sorted(range(n), key=lambda i: -lengths[i])
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size]
        batch = collate([split.dataset[i] for i in idx])
        sums, counts = scorer(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device)
        )
        scatter_pair_scores(out, idx, sums, counts)
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return ReferenceLogps(**out)


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


