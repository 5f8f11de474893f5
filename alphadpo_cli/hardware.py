"""What this machine can do: whether its CPU multiplies bf16 in hardware (read from its flags), its
matmul peak (a GPU's from a table of dense peaks, a CPU's measured), the CPU's model name.

Without bf16 instructions PyTorch emulates every bf16 matmul on the CPU, far slower than float32
(1.2 against 88 GFLOP/s on a 2-core AMD EPYC without AVX-512, measured by benchmarks/bench_dpo.py).
The trainer warns before loading a bf16 model on such a CPU, `model.dtype=auto` picks float32 there,
and the benchmarks measure a bf16 matmul peak only where it is native. A base module that any layer
may import: torch is imported only inside the functions that measure (`matmul_peak_gflops`), so the
benchmarks can import this module before they set the thread counts.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import dataclass
from typing import Mapping

#: x86 CPU flags (/proc/cpuinfo "flags") of native bf16 matmuls: AVX512-BF16 (Cooper Lake, Zen 4 and
#: later) and AMX-BF16 (Sapphire Rapids and later).
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The Arm feature (/proc/cpuinfo "Features", FEAT_BF16 of Armv8.6: Neoverse V1/N2/V2, Graviton 3/4, Grace).
ARM_BF16_FEATURE = "bf16"
#: The environment variable that overrides the detection ("1": native, "0": not).
OVERRIDE = "ALPHADPO_CPU_BF16"


@dataclass(frozen=True)
class CpuBf16:
    """Whether the CPU multiplies bf16 natively, and why we think so (for messages)."""

    native: bool
    reason: str


def _flags(cpuinfo: str, key: str) -> set[str] | None:
    """The words of the first `key: ...` line of a /proc/cpuinfo text (None without one)."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == key:
            return set(value.split())
    return None


def cpu_bf16(*, cpuinfo: str | None = None, machine: str | None = None,
             env: Mapping[str, str] | None = None) -> CpuBf16:
    """Whether this CPU has bf16 matmul instructions, decided from its flags.

    ``cpuinfo`` (the text of /proc/cpuinfo), ``machine`` (`platform.machine()`) and ``env`` (for the
    ALPHADPO_CPU_BF16=0/1 override) are read from the machine unless given (tests give them).
    x86: ``avx512_bf16`` or ``amx_bf16`` among the "flags"; Arm: ``bf16`` among the "Features". Where
    the flags cannot be read (no /proc/cpuinfo: macOS, Windows) or the architecture is another one,
    bf16 counts as emulated: float32 is then the safe choice, never much slower than bf16 would be."""
    env = os.environ if env is None else env
    forced = env.get(OVERRIDE)
    if forced in ("0", "1"):
        return CpuBf16(forced == "1", f"{OVERRIDE}={forced} overrides the detection")
    arch = (machine if machine is not None else platform.machine()).lower()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return CpuBf16(False, f"the CPU's flags could not be read (no /proc/cpuinfo on this {arch or 'machine'})")
    if arch in ("x86_64", "amd64", "i386", "i686", "x86"):
        flags = _flags(cpuinfo, "flags")
        if flags is None:
            return CpuBf16(False, "no CPU flags in /proc/cpuinfo")
        found = [f for f in X86_BF16_FLAGS if f in flags]
        if found:
            return CpuBf16(True, f"this CPU has {' and '.join(found)}")
        return CpuBf16(False, f"this CPU has neither {' nor '.join(X86_BF16_FLAGS)} (/proc/cpuinfo flags)")
    if arch in ("aarch64", "arm64") or arch.startswith("armv"):
        features = _flags(cpuinfo, "features")
        if features is not None and ARM_BF16_FEATURE in features:
            return CpuBf16(True, f"this Arm CPU has the {ARM_BF16_FEATURE} feature")
        return CpuBf16(False, f"this Arm CPU lacks the {ARM_BF16_FEATURE} feature (/proc/cpuinfo Features)")
    return CpuBf16(False, f"no bf16 detection for this CPU architecture ({arch or 'unknown'})")


def cpu_has_native_bf16() -> bool:
    """`cpu_bf16().native`: bf16 weights halve memory and run about 2x faster than float32 here."""
    return cpu_bf16().native


def emulated_bf16_warning(dtype_name: str, device_type: str, support: CpuBf16 | None = None) -> str | None:
    """The warning for bf16 weights on a CPU that emulates bf16 (None where there is nothing to say):
    `dtype_name` as the run resolved it ("bf16", "fp32", ...), `device_type` "cpu" or "cuda"."""
    if dtype_name != "bf16" or device_type != "cpu":
        return None
    support = support or cpu_bf16()
    if support.native:
        return None
    return (f"model.dtype=bf16 on a CPU without bf16 instructions ({support.reason}): every bf16 matmul is "
            "emulated, tens of times slower than float32 (1.2 against 88 GFLOP/s on a 2-core AMD EPYC), so a "
            "step can take many minutes. Train in float32 instead: --set model.dtype=fp32 (model.dtype=auto "
            "picks it on this CPU).")


# -- matmul peaks --------------------------------------------------------------------------------

#: Dense (no sparsity) tensor-core peaks in TFLOP/s of the vendor data sheets: bf16 (fp16 the same),
#: tf32 (float32 matmuls where torch allows TF32) and plain fp32 (CUDA cores). Matched against
#: `torch.cuda.get_device_name()` in this order, as whole words ("A10" is not "A10G", "H200" not
#: "GH200"); an unknown GPU has no peak, and no MFU is reported for it.
DENSE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GH200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
}


def gpu_dense_peak_tflops(device_name: str, dtype_name: str = "bf16") -> float | None:
    """The dense peak of a GPU named `device_name` for matmuls in `dtype_name` ("bf16", "fp16",
    "tf32", "fp32"), or None for a GPU or dtype the table does not know."""
    column = "bf16" if dtype_name == "fp16" else dtype_name
    for key, peaks in DENSE_PEAK_TFLOPS.items():
        if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w])", device_name):
            return peaks.get(column)
    return None


def matmul_peak_gflops(device: str, dtype_name: str = "fp32", *, shapes=None, reps: int | None = None,
                       min_seconds: float = 0.0) -> float:
    """The best rate of (m, k) @ (k, n) matmuls in `dtype_name` on `device`, measured now, in GFLOP/s:
    each shape multiplied twice untimed, then `reps` times (at least; more until `min_seconds`
    have passed) timed. The inputs come from a generator of their own: the global RNG (a training
    run's dropout and data order) is left as it was."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
    on_cpu = device == "cpu"
    shapes = shapes or ([(1024, 576, 1536), (2048, 2048, 2048)] if on_cpu else [(8192, 8192, 8192)])
    reps = reps or (5 if on_cpu else 20)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize  # noqa: E731
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=gen)
        for _ in range(2):
            a @ b
        sync()
        done, start = 0, time.perf_counter()
        while done < reps or time.perf_counter() - start < min_seconds:
            a @ b
            done += 1
            if not on_cpu and done >= reps:
                sync()
        sync()
        best = max(best, 2 * m * k * n * done / (time.perf_counter() - start) / 1e9)
    return best


@dataclass(frozen=True)
class Peak:
    """A device's matmul peak in FLOP/s (None: unknown, no MFU) and where the number comes from."""

    flops: float | None
    source: str


@functools.lru_cache(maxsize=None)
def cpu_matmul_peak(dtype_name: str) -> Peak:
    """This CPU's matmul rate in `dtype_name`, measured once per process (a few hundred ms: two
    shapes of about 2 GFLOP, at least 0.1 s each): the peak a CPU run's MFU is taken against. Not
    measured (flops None) for bf16 on a CPU that emulates it (`cpu_bf16`; the measurement alone
    would take minutes, and an MFU against it means nothing) nor for fp16."""
    if dtype_name == "bf16":
        support = cpu_bf16()
        if not support.native:
            return Peak(None, f"not measured: bf16 is emulated on this CPU ({support.reason})")
    elif dtype_name != "fp32":
        return Peak(None, f"not measured: no CPU peak for {dtype_name}")
    gflops = matmul_peak_gflops("cpu", dtype_name, shapes=[(1024, 576, 1536), (1024, 1024, 1024)], reps=2,
                                min_seconds=0.1)
    return Peak(gflops * 1e9, f"{dtype_name} matmul rate measured on this CPU ({gflops:.1f} GFLOP/s)")


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13", from /proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() in ("model name", "hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
