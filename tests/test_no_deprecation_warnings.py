"""Warnings the trainer used to print: torch's scheduler-order warning on a skipped first step, and
transformers' deprecation of `gradient_checkpointing_enable`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from alphadpo_cli.config import ModelConfig, resolve_config
from alphadpo_cli.losses import compute_loss
from alphadpo_cli.models.checkpointing import checkpoint_layers, enable_checkpointing
from alphadpo_cli.models.loading import build_tiny_model
from alphadpo_cli.train.trainer import Trainer

ORDER_WARNING = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"


def _cfg(out: Path, prefs_dir) -> object:
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={out}", "data.max_samples=16",
            "data.max_eval_samples=4", "training.logging_steps=1", "training.per_device_batch_size=4",
            "training.global_batch_size=4", "training.max_steps=4", "training.lr_scheduler=linear",
            "training.warmup_ratio=0.5", "training.learning_rate=1e-3"]
    return resolve_config(preset="tiny", overrides=sets)


def _run(cfg, nan_calls: set[int]) -> tuple[list[dict], list[warnings.WarningMessage]]:
    calls = {"n": 0}

    def loss_fn(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in nan_calls:
            out.losses = out.losses * float("nan")
        return out

    trainer = Trainer(cfg)
    trainer.objective.loss_fn = loss_fn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run()
    rows = [json.loads(line) for line in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, caught


def test_skipped_first_step_advances_the_schedule_without_the_scheduler_order_warning(tmp_path, prefs_dir):
    # Step 1 skipped (its loss NaN): the optimiser never steps before the scheduler's first step. The
    # schedule still advances on the skipped step, so every step logs the learning rate it logs in a
    # run where nothing is skipped: linear, 2 warm-up steps of 4, 1e-3 -> 0, 5e-4, 1e-3, 5e-4.
    skipped, caught = _run(_cfg(tmp_path / "skip", prefs_dir), nan_calls={1})
    assert [r["nonfinite_skipped"] for r in skipped] == [1, 1, 1, 1]
    order = [str(w.message) for w in caught if ORDER_WARNING in str(w.message)]
    assert not order, order
    clean, _ = _run(_cfg(tmp_path / "clean", prefs_dir), nan_calls=set())
    assert [r["nonfinite_skipped"] for r in clean] == [0, 0, 0, 0]
    expected = [0.0, 5e-4, 1e-3, 5e-4]
    assert [r["learning_rate"] for r in clean] == expected
    assert [r["learning_rate"] for r in skipped] == expected


def test_checkpointing_uses_no_deprecated_transformers_api():
    model = build_tiny_model(ModelConfig(tiny_layers=2), 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_checkpointing(model)
        assert checkpoint_layers(model, 1) == 1
    assert model.is_activation_checkpointing
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, deprecations


def test_lora_loading_shows_no_library_deprecation(tmp_path):
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model
    (`get_peft_model`, `PeftModel.from_pretrained`): our loaders keep that FutureWarning from users."""
    from alphadpo_cli.config import LoraConfig
    from alphadpo_cli.models.loading import load_for_inference, load_models

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = load_models(ModelConfig(), LoraConfig(r=2), need_reference_model=False)
        models.policy.save_pretrained(str(tmp_path / "adapter"))
        load_for_inference("tiny-random", str(tmp_path / "adapter"), dtype="fp32", device="cpu")
    # (torch.jit's own deprecation, raised while a library is first imported, is not a call of ours)
    ours = [f"{w.filename}: {w.message}" for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "/torch/jit/" not in w.filename]
    assert not ours, ours
