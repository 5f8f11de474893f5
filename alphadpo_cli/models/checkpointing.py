"""Activation checkpointing of decoder layers, with the recompute run as the forward ran."""

from __future__ import annotations

import contextlib

from torch import nn

from .adapters import unwrap_causal_lm


@contextlib.contextmanager
def _input_casting_off(layers):
    saved = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, v in zip(layers, saved):
            m.cast_input_dtype_enabled = v


class RecomputeAsForward:
    """`context_fn` of torch's non-reentrant checkpoint: the backward's recompute runs with PEFT's adapter
    input casting switched as it was in the forward.

    torch saves and restores the autocast state (and the RNG) for a recompute, but not PEFT's per-layer
    `cast_input_dtype_enabled`, which `adapter_autocast` turns off only while the forward runs. Without
    this the backward recomputed bf16 LoRA layers with their inputs cast to float32: the LoRA dropout then
    saved float32 tensors where the forward had saved bf16 ones, and torch raised `CheckpointError`
    ("Recomputed values ... have different metadata"). With dropout 0 it did not raise, but recomputed
    a different (float32-cast) computation than the one it differentiated.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._layers: list | None = None

    def _tuner_layers(self) -> list:
        if self._layers is None:  # adapters are injected before training starts; looked up once
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    @property
    def has_adapters(self) -> bool:
        return bool(self._tuner_layers())

    def __call__(self):
        off = [m for m in self._tuner_layers() if not getattr(m, "cast_input_dtype_enabled", True)]
        return contextlib.nullcontext(), (_input_casting_off(off) if off else contextlib.nullcontext())


def checkpointing_kwargs(model: nn.Module) -> dict:
    """`gradient_checkpointing_kwargs` for `model` (a transformers model, possibly inside peft):
    non-reentrant, with the recompute run as the forward ran (`RecomputeAsForward`)."""
    return {"use_reentrant": False, "context_fn": RecomputeAsForward(model)}


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on every decoder layer of `model`, with `checkpointing_kwargs`, through
    transformers' `activation_checkpointing_enable`; transformers before 5.23 (the GPU image's 5.17,
    found by `make gpu-rehearsal`) has only the older, now deprecated name `gradient_checkpointing_enable`."""
    lm = unwrap_causal_lm(model)
    kwargs = checkpointing_kwargs(model)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _recomputes_as_forward(layer: nn.Module) -> bool:
    """Whether `layer`'s checkpoint function is non-reentrant with a `RecomputeAsForward` context."""
    keywords = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {}
    return isinstance(keywords.get("context_fn"), RecomputeAsForward)


def checkpoint_layers(model: nn.Module, n: int) -> int:
    """Activation checkpointing on the first `n` decoder layers only; n < 0 leaves the model as it is.

    Between none (fastest) and all (leanest): each checkpointed layer stores only its input and
    recomputes its forward in backward. Returns the number of checkpointed layers.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = unwrap_causal_lm(model)
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if n < 0:
        return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in layers)
    if n > 0 and not all(_recomputes_as_forward(m) for m in layers):
        enable_checkpointing(model)
    for i, m in enumerate(layers):
        m.gradient_checkpointing = i < n
    return min(n, len(layers))


