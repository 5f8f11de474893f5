"""A LoRA trained on a model that ties its input and output embeddings (the tiny Llama, like SmolLM2),
saved with `training.merge: true` (`train.checkpoint.save_final_model` -> `models.merging.merged_model`):
the merged model reloaded with plain transformers computes what the trained adapter computes, and

* with the adapters on the attention/MLP projections (the presets' `all-linear`, which leaves out the
  output layer) it still ties: one shared weight and `tie_word_embeddings: true`;
* with an adapter on the tied head (`lora.target_modules: [q_proj, lm_head]`) it is untied, the head its
  own merged weight, the input embedding the base's: merged into the one shared weight, the head's delta
  would change the input embedding too (the merged logits were up to 0.28 off the trained model's here).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from alphadpo_cli.config import resolve_config
from alphadpo_cli.models.loading import load_for_inference, merged_model
from alphadpo_cli.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_merged(out: Path, prefs_dir: Path, *extra: str) -> list[warnings.WarningMessage]:
    cfg = resolve_config(preset="tiny", overrides=[
        f"data.dataset={prefs_dir}", f"training.output_dir={out}", "training.merge=true", "training.max_steps=2",
        "training.warmup_ratio=0", "training.learning_rate=1e-2", "data.max_samples=8", "data.eval_split=null",
        "data.max_length=256", "data.max_prompt_length=128", "training.per_device_batch_size=4",
        "training.global_batch_size=4", *extra])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg).run()
    return caught


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _shares_weight(model) -> bool:
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def _reloaded_and_adapter(out: Path):
    """(merged model reloaded from out/merged, the trained adapter on its base, fixed token ids)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    adapter, _ = load_for_inference(str(out), dtype="fp32", device="cpu")
    ids = torch.randint(0, saved.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    return saved, adapter, ids


def test_merged_lora_on_the_projections_keeps_the_tie(tmp_path, prefs_dir):
    out = tmp_path / "run"
    _train_merged(out, prefs_dir)
    saved, adapter, ids = _reloaded_and_adapter(out)
    with adapter.disable_adapter():
        base = _logits(adapter, ids)
    trained = _logits(adapter, ids)
    assert (trained - base).abs().max() > 1e-3  # the adapters moved the model: the logits below tell
    merged = merged_model(adapter)  # the in-memory merge of the same adapter
    assert merged.config.tie_word_embeddings and _shares_weight(merged)
    assert saved.config.tie_word_embeddings and _shares_weight(saved)
    assert saved.get_output_embeddings().weight is saved.get_input_embeddings().weight
    assert torch.equal(_logits(saved, ids), _logits(merged, ids))
    torch.testing.assert_close(_logits(saved, ids), trained, rtol=1e-5, atol=1e-5)


def test_merged_lora_on_the_tied_head_unties_it(tmp_path, prefs_dir):
    out = tmp_path / "run"
    caught = _train_merged(out, prefs_dir, "lora.target_modules=[q_proj, lm_head]")
    tied_warnings = [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)]
    assert not tied_warnings, tied_warnings  # peft's warnings about it: handled, not shown
    saved, adapter, ids = _reloaded_and_adapter(out)
    trained = _logits(adapter, ids)
    base_embedding = adapter.get_input_embeddings().weight  # no adapter on the input embedding
    assert not saved.config.tie_word_embeddings and not _shares_weight(saved)
    assert torch.equal(saved.get_input_embeddings().weight, base_embedding)  # the head's delta stayed in the head
    torch.testing.assert_close(_logits(saved, ids), trained, rtol=1e-5, atol=1e-5)
