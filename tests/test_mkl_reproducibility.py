"""The package asks Intel MKL for alignment-independent results (MKL_CBWR=AUTO,STRICT) before torch
loads, keeping a value the user set. Without it, on CPUs without AVX-512 (MKL_ENABLE_INSTRUCTIONS=AVX2
shows it on any x86 CPU), a run resumed from a checkpoint drifted from the uninterrupted one in the 5th
digit: tests/test_iterate_rounds.py::test_a_kill_in_each_phase_then_resume_gives_the_same_run is
the behavioural check (it failed there before, and passes with the setting)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import os, alphadpo_cli, torch; torch.ones(2, 2) @ torch.ones(2, 2); print(os.environ.get('MKL_CBWR'))"


def _probe(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_the_package_sets_strict_reproducibility_before_torch_and_keeps_a_users_value():
    assert _probe() == "AUTO,STRICT"
    assert _probe(MKL_CBWR="COMPATIBLE") == "COMPATIBLE"
