"""The two glibc settings of `alphadpo_cli.kernels.cpu`, by what they do to a loop of steps that
allocate and free the same tensors (as training steps and decoding steps do): whether a step in the
steady state faults in fresh pages (getrusage's minor faults). Each setting in a fresh process: the
heap an earlier test leaves behind would serve the tensors either way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

SIZES_MB = (5, 20, 1, 8, 12, 3)  # above the 2 MiB trimming threshold, below glibc's 32 MiB ceiling

LOOP = """
import json, resource, sys
import torch
from alphadpo_cli.kernels.cpu import set_cpu_memory
applied = set_cpu_memory(trim=sys.argv[1] == "trim")
x = torch.randn(64, 256)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = []
    for mb in json.loads(sys.argv[2]):
        live.append(torch.ones(mb << 18) * 2)  # a temporary and a result, float32
        live.append(x @ x.T)  # small tensors in between
    live.clear()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOOP, mode, json.dumps(SIZES_MB)], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_reuses_freed_memory_and_trim_returns_it():
    pages = sum(SIZES_MB) * (1 << 20) // 4096
    kept, trimmed = _run("keep"), _run("trim")
    assert kept["applied"] and trimmed["applied"]
    assert trimmed["faults"][-1] > pages  # each large tensor a fresh mapping, faulted in every step
    assert kept["faults"][0] > pages // 2  # the first step touches fresh memory either way
    # later steps reuse the heap's pages (all but an occasional block the heap's fragmentation moves)
    steady_kept, steady_trimmed = kept["faults"][2:], trimmed["faults"][2:]
    assert sum(steady_kept) < sum(steady_trimmed) / 5 and min(steady_kept) < pages // 50
