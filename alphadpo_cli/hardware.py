"""What this machine's CPU can do, read from its flags: whether it multiplies bf16 in hardware.

Without bf16 instructions PyTorch emulates every bf16 matmul on the CPU, far slower than float32
(1.2 against 88 GFLOP/s on a 2-core AMD EPYC without AVX-512, measured by benchmarks/bench_dpo.py).
The trainer warns before loading a bf16 model on such a CPU, `model.dtype=auto` picks float32 there,
and the benchmarks measure a bf16 matmul peak only where it is native. Pure Python, no torch: a base
module that any layer may import.
"""

from __future__ import annotations

import os
import platform
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
