"""The adapters of a trained peft model merged into its base, as a plain transformers model.

A model that ties its input and output embeddings (SmolLM2, the tiny model) keeps the tie when the
adapters sit elsewhere (the default `all-linear` targets no embedding: peft leaves out the output
layer). An adapter on the tied head or embedding (e.g. `lora.target_modules: [q_proj, lm_head]`)
changes one of the two only, so the merged model unties them (`tie_word_embeddings: false`, the head
its own copy): merged in place into the shared weight, the head's delta would land in the input
embedding too, and the merged model would compute other numbers than the trained one.
"""

from __future__ import annotations

import copy

import torch

from .quantized import is_4bit


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The adapters of a peft `model` merged into its base, as a plain transformers model.

    LoRA: peft's `merge_and_unload`. QLoRA: the 4-bit base is dequantised and the adapters' deltas
    added to it in float32, giving an ordinary (unquantised) model in the 4-bit layers' compute dtype
    that loads with `AutoModelForCausalLM.from_pretrained`; the trained model is left as it is. (peft's
    own merge of a 4-bit layer re-quantises the merged weight, a second rounding to 4 bits.)

    Its log-probs are those of the adapter on the 4-bit base up to float rounding. Measured,
    per-sequence response log-prob sums: float32 compute, SmolLM2-135M max |Δ| 5e-5 on sums of ~250
    (3e-6 per token), the tiny model 6e-5 on ~720 (tests/test_qlora.py asserts 1e-6 relative); bf16
    compute (a bf16 model throughout, where the 4-bit one keeps float32 norms and residuals),
    SmolLM2-135M max 1.1 on ~250 (mean 0.012 per token: bf16 rounding, as large as the 4-bit model's
    own bf16 matmuls vs float32 math), the tiny model 0.04 on ~720 (asserted: 5e-4 relative).
    """
    if not is_4bit(model):
        if not hasattr(model, "merge_and_unload"):
            return model
        if adapts_tied_embeddings(model):
            _untie_output_embeddings(model.get_base_model())
        return model.merge_and_unload()
    return _merge_dequantized(model)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unwrapped(layer):
    """The layer an adapter wraps (peft's `get_base_layer`), or `layer` itself."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def adapts_tied_embeddings(model: torch.nn.Module) -> bool:
    """Whether `model` ties its input and output embeddings and an adapter sits on one of them."""
    base = _base(model)
    if not getattr(base.config, "tie_word_embeddings", False):
        return False
    layers = [base.get_input_embeddings(), base.get_output_embeddings()]
    if any(layer is None for layer in layers) or not any(hasattr(layer, "get_base_layer") for layer in layers):
        return False
    return _unwrapped(layers[0]).weight is _unwrapped(layers[1]).weight


def _untie_output_embeddings(base: torch.nn.Module) -> None:
    """The output layer gets its own copy of the shared weight; the config says untied."""
    head = _unwrapped(base.get_output_embeddings())
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    base.config.tie_word_embeddings = False


@torch.no_grad()
def _merge_dequantized(model: torch.nn.Module) -> torch.nn.Module:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    base = _base(model)
    untie = adapts_tied_embeddings(model)
    compute = next((m.compute_dtype for m in base.modules() if isinstance(m, bnb.nn.Linear4bit) and m.compute_dtype),
                   torch.float32)
    state = _dequantized_state(base, compute, keep_tied=untie)
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.use_cache = True
    if untie:
        config.tie_word_embeddings = False
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=compute)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    for name, buf in base.named_buffers():  # e.g. rotary inv_freq (not in the state dict)
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buf.detach().cpu().clone()
    plain.tie_weights()
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if unexpected or left:
        raise RuntimeError(f"merging the QLoRA adapters: unexpected weights {unexpected[:5]}, unset {left[:5]}")
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)
    plain.config.use_cache = True
    return plain.eval()


def _dense(layer) -> torch.Tensor:
    """A layer's weight in float32; a 4-bit one dequantised (the codes times the absmax, as the kernels
    compute them), not rounded to the dtype the weight was quantised from."""
    from bitsandbytes.functional import dequantize_4bit

    w = layer.weight
    if type(w).__name__ == "Params4bit":
        state = copy.copy(w.quant_state)
        state.dtype = torch.float32
        return dequantize_4bit(w.data, state)
    return w.detach().float()


def _dequantized_state(base: torch.nn.Module, compute: torch.dtype, *, keep_tied: bool) -> dict[str, torch.Tensor]:
    """The plain model's state dict in `compute`: every adapted layer's dense weight plus its active
    adapters' deltas, every other 4-bit layer dequantised, the rest copied. `keep_tied`: a weight
    shared by two layers is listed under both names (the merged model unties them)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    state: dict[str, torch.Tensor] = {}
    replaced: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in replaced):
            continue  # the base layer inside a LoRA layer, the adapters themselves
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            w = _dense(layer)
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in module.merged_adapters:
                    w += module.get_delta_weight(adapter).float()
        elif isinstance(module, bnb.nn.Linear4bit):
            layer, w = module, _dense(module)
        else:
            continue
        replaced.append(name + ".")
        state[name + ".weight"] = w.to(compute).cpu()
        if getattr(layer, "bias", None) is not None:
            state[name + ".bias"] = layer.bias.detach().to(compute).cpu()
    for name, p in base.named_parameters(remove_duplicate=not keep_tied):
        if not any(name.startswith(prefix) for prefix in replaced):
            state[name] = p.detach().to(compute).cpu().clone()
    return state
