"""The plan of one packed forward: its segments, their masks, the varlen index and the config copy
whose attention implementation is the segment kernel (see `alphadpo_cli.kernels.segment_attention`)."""

from __future__ import annotations

import torch

SEGMENT_KWARG = "alphadpo_segments"
# The name registered with transformers' AttentionInterface. It contains none of "sdpa", "flash",
# "flex", "paged": transformers picks code paths by substrings of the implementation name.
SEGMENT_IMPL = "alphadpo_segment_attention"


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
