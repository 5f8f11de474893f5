"""`alphadpo compare`: methods × a grid of settings × seeds, each an ordinary `train` run; a grid's
setting chosen per method on a validation slice carved from the training prompts, reported on the
test prompts; intervals over seeds and paired per-prompt differences (docs/compare.md).

    from alphadpo_cli.compare import CompareOptions, run_compare
    run_compare(CompareOptions(preset="demo", losses=("alpha_dpo", "simpo", "dpo"), seeds=3,
                               reward="examples/verifiable_reward.py:reward"))

Above train/, rewards/ and evaluation/ (it drives them through their APIs), below cli/."""

from __future__ import annotations

from .driver import run_compare
from .options import CompareOptions, parse_grid, parse_seeds
from .stats import interval, paired_difference

__all__ = ["CompareOptions", "run_compare", "parse_grid", "parse_seeds", "interval", "paired_difference"]
