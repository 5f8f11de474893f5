"""Summary statistics of a batch of values, as the training logs name them (``margin/mean`` ...).

One definition for the two places that log them: the loss methods' metrics (``LossOutput.metrics``)
and the trainer's per-step metrics. Imports nothing from the package, so any layer may use it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def summary_stats(prefix: str, x: Tensor) -> dict[str, Tensor]:
    """``prefix``/mean, /std (unbiased, 0 for one value), /min, /max of ``x``, as float64 0-d tensors."""
    x = x.detach().to(torch.float64)
    std = x.std(unbiased=True) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    return {f"{prefix}/mean": x.mean(), f"{prefix}/std": std, f"{prefix}/min": x.min(), f"{prefix}/max": x.max()}
