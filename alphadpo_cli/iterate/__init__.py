"""Online α-DPO (`alphadpo iterate`): rounds of sample → score → pair → train → judge, as one
resumable experiment with a result per round.

    from alphadpo_cli.iterate import IterateOptions, run_iterate
    record = run_iterate(IterateOptions(prompts="pkg:alphadpo_cli/demo", heldout_split="test",
                                        reward="examples/verifiable_reward.py:reward", preset="demo",
                                        rounds=3, output_dir="outputs/iterate"))

Round k samples N answers per prompt from π_{k-1} on its own slice of the prompts (`data build`),
trains π_k from π_{k-1} (`train`, the preset's method) against the chosen reference (π_{k-1}, or π_0
throughout), and judges π_k on held-out prompts against π_0 and π_{k-1} (`eval reward`). It sits
above `train`, `rewards` and `evaluation` and calls only their public APIs.

The parts, in reading order: `options` (`IterateOptions`, its checks and identity), `prompts` (the
slices and the held-out set), `layout` (where each file goes, and which model each round starts
from and is judged as), `phases` (sample, train, judge), `driver` (the rounds, resuming, the
offline round) and `report` (the table, rounds.json, rounds.png). See docs/iterate.md.
"""

from __future__ import annotations

from .driver import prepare, run_iterate
from .layout import Layout, Models
from .options import REFERENCES, IterateOptions, check_options

__all__ = ["IterateOptions", "REFERENCES", "check_options", "prepare", "run_iterate", "Layout", "Models"]
