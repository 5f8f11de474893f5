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

Attention over the segments is `alphadpo_cli.kernels.segment_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

# Keys of a packed batch that `SequenceLogps.forward` takes (besides `input_ids`).
PACKED_KEYS = ("position_ids", "segments", "target_index", "target_labels", "target_seq", "num_sequences")


# ---------------------------------------------------------------------------------------------
# batching


class PairCollator:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        """Chosen rows 0..B-1 then rejected rows B..2B-1, right-padded, for one concatenated forward.

        `response_mask[i, t]` marks positions whose token is a response token (predicted from t-1);
        `index` is each pair's position in the tokenised split (it keys the reference caches).
        """
        seqs, resp_starts = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                seqs.append(list(ex["prompt_ids"]) + list(ex[side]))
                resp_starts.append(len(ex["prompt_ids"]))
        T = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, T), self.pad, dtype=torch.long)
        attention = torch.zeros((n, T), dtype=torch.long)
        response = torch.zeros((n, T), dtype=torch.bool)
        for i, (s, start) in enumerate(zip(seqs, resp_starts)):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention[i, : len(s)] = 1
            response[i, start: len(s)] = True
        index = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response, "index": index}


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
    """Drop-in for `PairCollator` producing one packed, padding-free row per micro-batch.

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


