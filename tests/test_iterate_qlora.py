"""QLoRA with `--reference previous`: round k+1 loads round k's merged (dequantised) weights and
quantises them to 4 bits again. The tolerance docs/iterate.md states is measured here on the tiny
model: max |logit| between the merged float32 model and its 4-bit requantisation, against what
quantising π_0 itself the first time costs."""

from __future__ import annotations

import torch

from alphadpo_cli.config import LoraConfig, ModelConfig
from alphadpo_cli.models.loading import is_4bit, load_models, merged_model
from alphadpo_cli.models.pretrained import load_base, load_tokenizer


def _quantisation_error(cfg: ModelConfig, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    tok = load_tokenizer(cfg)
    full = load_base(cfg, tok, torch.float32).eval()
    four_bit = load_base(cfg, tok, torch.float32, quantize_4bit=True).eval()
    assert is_4bit(four_bit) and not is_4bit(full)
    with torch.no_grad():
        a = full(input_ids=ids).logits.float()
        b = four_bit(input_ids=ids.to(four_bit.device)).logits.float().cpu()
    return (a - b).abs().max().item(), a


def test_requantising_the_merged_model_costs_what_the_first_quantisation_did(tmp_path):
    """Measured (tiny model, LoRA B ~ N(0, 0.02), r 4): max |Δlogit| 0.087 after requantising the
    merged model, 0.10 for quantising π_0 itself; the merge itself 4e-7 (float32)."""
    models = load_models(ModelConfig(mode="qlora", dtype="fp32"), LoraConfig(r=4, alpha=8, dropout=0.0),
                         need_reference_model=False)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained round's adapter, roughly
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ids = torch.randint(0, len(models.tokenizer), (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = models.policy.eval()(input_ids=ids).logits.float().cpu()
    merged = merged_model(models.policy)
    merged.save_pretrained(tmp_path / "merged")
    models.tokenizer.save_pretrained(tmp_path / "merged")
    again, merged_logits = _quantisation_error(ModelConfig(name_or_path=str(tmp_path / "merged"), dtype="fp32"), ids)
    first, _ = _quantisation_error(ModelConfig(dtype="fp32"), ids)
    merge = (merged_logits - trained).abs().max().item()
    print(f"\nQLoRA: merge {merge:.2g}, requantisation {again:.3g}, first quantisation of π_0 {first:.3g} (max |Δlogit|)")
    assert merge < 1e-5
    assert again < 1.5 * first
