"""Replaced by the command `alphadpo compare` (docs/compare.md); `make compare` runs it. Kept as a
pointer: this script runs that command with `make compare`'s settings, passing on any further flags.

    alphadpo compare --preset demo --loss alpha_dpo,simpo,dpo --seeds 3 \
        --reward examples/verifiable_reward.py:reward -o outputs/compare
"""

from __future__ import annotations

import sys
from pathlib import Path

REWARD = f"{Path(__file__).resolve().parent / 'verifiable_reward.py'}:reward"
ARGS = ["--preset", "demo", "--loss", "alpha_dpo,simpo,dpo", "--seeds", "3", "--reward", REWARD,
        "-o", "outputs/compare"]

if __name__ == "__main__":
    from alphadpo_cli.cli.compare import compare

    compare.main(ARGS + sys.argv[1:], prog_name="alphadpo compare")
