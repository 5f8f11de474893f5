"""The lean RMSNorm: same outputs as transformers', same gradients, fewer bytes kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from alphadpo_cli.config import ModelConfig
from alphadpo_cli.models.loading import build_tiny_model
from alphadpo_cli.kernels.norms import install_lean_rmsnorm


def _saved_bytes(fn) -> int:
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norms_match_the_model_and_keep_less(dtype):
    model = build_tiny_model(ModelConfig(), 300).to(dtype)  # full fine-tuning: norm weights get gradients
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "norm" in n:
            torch.nn.init.normal_(p, mean=1.0, std=0.3)
    lean = copy.deepcopy(model)
    n_norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    assert install_lean_rmsnorm(lean) == n_norms > 0
    assert install_lean_rmsnorm(lean) == 0  # installing twice changes nothing
    ids = torch.randint(0, 300, (2, 24))

    out = model(input_ids=ids).logits
    (out.float().square().mean()).backward()
    got = lean(input_ids=ids).logits
    (got.float().square().mean()).backward()
    assert torch.equal(out, got)  # the forward is operation for operation the same
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    lean_params = dict(lean.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad.float(), lean_params[n].grad.float(), **tol), n

    kept = _saved_bytes(lambda: model(input_ids=ids).logits)
    kept_lean = _saved_bytes(lambda: lean(input_ids=ids).logits)
    assert kept_lean < kept
    with torch.no_grad():  # inference takes the module's own forward
        assert torch.equal(model(input_ids=ids).logits, lean(input_ids=ids).logits)


def test_other_norm_formulas_are_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # (1 + w) * x: not Llama's form

    norm = GemmaRMSNorm(16)
    torch.nn.init.normal_(norm.weight)
    assert install_lean_rmsnorm(norm) == 0
    assert "_alphadpo_original_forward" not in vars(norm)


def test_lean_norms_under_activation_checkpointing():
    """Checkpointed layers run the norm's forward twice (once in backward): gradients must not change."""
    model = build_tiny_model(ModelConfig(), 300)
    lean = copy.deepcopy(model)
    install_lean_rmsnorm(lean)
    lean.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lean.train()
    model.train()
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids).logits.square().mean().backward()
    lean(input_ids=ids).logits.square().mean().backward()
    lean_params = dict(lean.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, lean_params[n].grad, rtol=1e-5, atol=1e-6), n
