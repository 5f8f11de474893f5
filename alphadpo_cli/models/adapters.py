"""How a (possibly peft-wrapped) causal LM computes with and without its adapters."""

from __future__ import annotations

import contextlib

import torch
from typing import Iterator

from torch import nn


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def adapter_free(module: nn.Module) -> nn.Module:
    """The module as it computes with adapters disabled: a peft-wrapped layer's base layer (LoRA on
    the LM head), the original of a modules_to_save copy; any other module is itself."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    if isinstance(module, AuxiliaryTrainingWrapper):
        return module.original_module
    return module


def adapter_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The base weights' dtype when float32 adapters sit on bf16/fp16 weights, else None.

    That is PEFT's default for LoRA on a bf16 model (adapters kept in float32 for the optimiser). PEFT
    then casts every adapter input up to float32 and the result back: on CPU that was 12% of a
    step in copies, and the adapter matmuls ran in float32.
    """
    lm = unwrap_causal_lm(model)
    emb = lm.get_input_embeddings()
    low = getattr(getattr(emb, "weight", None), "dtype", None)
    if low not in (torch.bfloat16, torch.float16):
        return None
    if not any(p.dtype == torch.float32 and p.requires_grad for p in model.parameters()):
        return None
    return low


def adapter_autocast(model: nn.Module, device: torch.device, dtype: torch.dtype | None):
    """Run float32 adapters in the base weights' precision, as mixed-precision training on a GPU does.

    Autocast computes the adapter matmuls in `dtype` (their float32 weights stay the optimiser's
    master copy, and get float32 gradients); PEFT's own input casting is switched off through its
    public `disable_input_dtype_casting`, so activations are not copied to float32 and back.

    Both last only as long as the forward. Under activation checkpointing the backward recomputes
    layers after it: torch restores the autocast state for that recompute, and the checkpoint's
    `context_fn` (`RecomputeAsForward`, installed by `checkpointing_kwargs`) restores the casting
    switch, so the recompute is the forward's computation again.
    """
    if dtype is None:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    stack.enter_context(disable_input_dtype_casting(model))
    return stack


@contextlib.contextmanager
def reference_mode(policy, reference=None) -> Iterator[torch.nn.Module]:
    """Yield the network that computes reference log-probs: the separate copy, or the policy with
    its adapters disabled (no second copy of the weights)."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise RuntimeError("no reference: the policy has no adapters and no reference model was loaded")
    was_training = policy.training
    policy.eval()  # no dropout in the reference pass
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(was_training)
