"""Pieces every method shares: the smoothed sigmoid loss, the reference check, and the metrics."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·logσ(x) − ε·logσ(−x)."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def require_reference(pc: Tensor, rc: Tensor | None, rr: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    if rc is None or rr is None:
        raise ValueError(f"{what} needs reference log-probs (ref_chosen_logps / ref_rejected_logps)")
    return rc, rr


class LossMetrics(Mapping[str, float]):
    """A method's extra logging values (:attr:`LossOutput.metrics`), read as Python floats.

    The loss stores detached 0-d tensors and converts nothing: a trainer that never reads them pays
    no device sync per micro-step. The first read converts them all at once (one sync, as a
    ``torch.stack(...).tolist()``) and keeps the floats; :meth:`tensors` gives the tensors untouched.
    """

    def __init__(self, values: Mapping[str, Tensor | float] | None = None) -> None:
        self._tensors = {k: v.detach() if isinstance(v, Tensor) else v for k, v in (values or {}).items()}
        self._floats: dict[str, float] | None = None

    def tensors(self) -> dict[str, Tensor | float]:
        """The stored values as given (detached 0-d tensors, or floats), without a device sync."""
        return dict(self._tensors)

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            self._floats = _to_floats(self._tensors)
        return self._floats

    def __getitem__(self, key: str) -> float:
        if key not in self._tensors:
            raise KeyError(key)
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __repr__(self) -> str:
        return f"LossMetrics({self._read()!r})"


def _to_floats(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Python floats, with a single device sync (every value is moved to the first tensor's device)."""
    if not metrics:
        return {}
    device = next((v.device for v in metrics.values() if isinstance(v, Tensor)), None)
    keys = list(metrics)
    values = torch.stack(
        [torch.as_tensor(metrics[k], dtype=torch.float64).reshape(()).to(device) for k in keys]
    ).tolist()
    return dict(zip(keys, values))
