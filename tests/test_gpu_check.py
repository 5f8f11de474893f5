"""The CPU-runnable parts of benchmarks/gpu_check.sh (the whole script: `bash benchmarks/gpu_check.sh
--cpu-smoke`, about 2.5 minutes, not run here): the script parses, the packed-vs-padded check passes on
the CPU, and the benchmark's CPU smoke workload (the GPU benchmark's code path at toy size) runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path):
    return dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                ALPHADPO_CACHE=str(tmp_path / "cache"))


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_packed_vs_padded_check_on_cpu(tmp_path):
    check = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]
    model = tmp_path / "model"
    subprocess.run([*check, "make-model", str(model), "--size", "tiny"], check=True, env=_env(tmp_path),
                   capture_output=True, timeout=300)
    proc = subprocess.run([*check, "packed-vs-padded", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                           "--tol", "1e-4"], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pass"] and out["packed_kernel"] == "per-segment sdpa" and out["max_abs_diff_mean_logp"] <= 1e-4


@pytest.mark.slow
def test_benchmark_cpu_smoke_workload(tmp_path):
    """The random-weights workload (llama3-8b on a GPU, llama-tiny-cpu here) names a model that is never
    downloaded: the alphadpo worker must not look it up (it did, once model_source checked the hub)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--workload", "llama-tiny-cpu",
                           "--systems", "alphadpo", "--threads", "1", "--out", str(tmp_path)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = tmp_path.glob("llama-tiny-cpu-*.json")
    data = json.loads(result.read_text())
    assert not data["failures"]
    (row,) = data["rows"]
    assert row["system"] == "alphadpo" and row["tokens_per_s"] > 0
