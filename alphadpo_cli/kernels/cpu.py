"""CPU memory behaviour of a training process."""

from __future__ import annotations


# ---------------------------------------------------------------------------------------------
# CPU memory


def tune_cpu_allocator(mmap_threshold: int = 2 << 20, trim_threshold: int = 1 << 20) -> bool:
    """Make glibc return large freed tensors to the OS (Linux; no effect elsewhere).

    glibc raises its mmap threshold every time a large block is freed, after which activations
    come from the heap and stay resident once freed: the RSS of a training loop climbs to a
    fragmented high-water mark well above what is live (SmolLM2 LoRA, 2 pairs of ~330 tokens:
    5.0 GB peak RSS instead of 2.9). A fixed threshold keeps blocks above it in their own
    mappings, released on free. The price is page faults on fresh memory: 2 MB keeps the small
    temporaries on the reused heap (~15% slower step here; 256 KB: 2.9 GB but ~40% slower).
    Returns whether it was applied.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))

