"""The CPU-runnable parts of benchmarks/gpu_check.sh (the whole script: `bash benchmarks/gpu_check.sh
--cpu-smoke`, about 2.5 minutes, not run here): the script parses, the packed-vs-padded check passes on
the CPU, and the benchmark's CPU smoke workload (the GPU benchmark's code path at toy size) runs."""

from __future__ import annotations

import json
import os
import platform
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
    downloaded: the alphadpo worker must not look it up (it did, once model_source checked the hub).
    On a CPU without bf16 instructions (ALPHADPO_CPU_BF16=0 stands for one) no bf16 matmul peak is
    measured: emulated, that alone took minutes; the output says it was skipped, and why."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--workload", "llama-tiny-cpu",
                           "--systems", "alphadpo", "--threads", "1", "--out", str(tmp_path)],
                          env=dict(_env(tmp_path), ALPHADPO_CPU_BF16="0"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = tmp_path.glob("llama-tiny-cpu-*.json")
    data = json.loads(result.read_text())
    assert not data["failures"]
    (row,) = data["rows"]
    assert row["system"] == "alphadpo" and row["tokens_per_s"] > 0
    assert "matmul_peak_gflops_bf16" not in data["env"] and data["env"]["cpu_native_bf16"] is False
    assert data["env"]["matmul_peak_gflops_bf16_skipped"] == "ALPHADPO_CPU_BF16=0 overrides the detection"
    assert "bf16 matmul peak: not measured (ALPHADPO_CPU_BF16=0 overrides the detection)" in proc.stdout


CPUINFO_X86 = "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 {extra}\nbugs\t\t: spectre_v1\n"
CPUINFO_ARM = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve {extra}\nCPU part\t: 0xd40\n"


@pytest.mark.parametrize("machine, cpuinfo, native", [
    ("x86_64", CPUINFO_X86.format(vendor="AuthenticAMD", extra="avx512f"), False),  # Zen 3 / EPYC without it
    ("x86_64", CPUINFO_X86.format(vendor="AuthenticAMD", extra="avx512f avx512_bf16"), True),  # Zen 4
    ("x86_64", CPUINFO_X86.format(vendor="GenuineIntel", extra="amx_tile amx_bf16"), True),  # Sapphire Rapids
    ("AMD64", CPUINFO_X86.format(vendor="GenuineIntel", extra="avx512_bf16x"), False),  # a flag is a whole word
    ("x86_64", "processor\t: 0\n", False),  # no flags line
    ("aarch64", CPUINFO_ARM.format(extra="i8mm bf16"), True),  # Neoverse V1 / Graviton 3
    ("aarch64", CPUINFO_ARM.format(extra="sha2"), False),  # Graviton 2
    ("ppc64le", "processor\t: 0\n", False),  # no detection for this architecture: emulated is assumed
])
def test_cpu_bf16_is_read_from_the_cpu_flags(machine, cpuinfo, native):
    from alphadpo_cli.hardware import cpu_bf16, emulated_bf16_warning

    got = cpu_bf16(cpuinfo=cpuinfo, machine=machine, env={})
    assert got.native is native and got.reason
    assert cpu_bf16(cpuinfo=cpuinfo, machine=machine, env={"ALPHADPO_CPU_BF16": "1"}).native
    assert not cpu_bf16(cpuinfo=cpuinfo, machine=machine, env={"ALPHADPO_CPU_BF16": "0"}).native
    warning = emulated_bf16_warning("bf16", "cpu", got)
    assert (warning is None) is native and (native or "--set model.dtype=fp32" in warning)
    assert emulated_bf16_warning("fp32", "cpu", got) is None and emulated_bf16_warning("bf16", "cuda", got) is None


def test_this_machines_cpu_bf16_matches_its_flags():
    """The models' dtype=auto and the benchmarks read the same detection (alphadpo_cli.hardware)."""
    from alphadpo_cli.hardware import X86_BF16_FLAGS, cpu_bf16
    from alphadpo_cli.models.loading import cpu_has_native_bf16

    info = Path("/proc/cpuinfo")
    got = cpu_bf16(env={})
    if info.is_file() and platform.machine().lower() in ("x86_64", "amd64"):
        flags = next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "").split()
        assert got.native == any(f in flags for f in X86_BF16_FLAGS)
    assert cpu_has_native_bf16() == cpu_bf16().native  # (the suite pins ALPHADPO_CPU_BF16=0)
