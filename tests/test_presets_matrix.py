"""Every shipped training preset x {lora, qlora, full}: two steps on a CPU, the tiny random model in place
of the preset's own, in the dtype, attention and checkpointing the preset asks for.

The paper presets ask for bf16, flash_attention_2 (SDPA here: no CUDA, no flash-attn) and gradient
checkpointing; the suite pins float32 for `dtype: auto` (ALPHADPO_CPU_BF16=0, tests/conftest.py), which
does not touch an explicit `bf16`. For bf16 presets the pin is lifted here so that the QLoRA cells'
4-bit matmuls run in bf16 too (elsewhere on a CPU without native bf16 they would fall back to float32).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alphadpo_cli.models import loading as modeling
from alphadpo_cli.cli import main
from alphadpo_cli.config import preset_names, resolve_config
from alphadpo_cli.train.launch import plan_launch
from alphadpo_cli.models.checkpointing import _recomputes_as_forward
from alphadpo_cli.models.adapters import unwrap_causal_lm
from alphadpo_cli.kernels.segment_attention import uses_segment_attention
from alphadpo_cli.models.loading import is_4bit, qlora_compute_dtype, resolve_dtype
from alphadpo_cli.train.trainer import Trainer

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"
TRAINING_PRESETS = ["demo", "tiny", "llama3-instruct", "llama3-v0.2", "mistral-instruct", "gemma2-instruct"]
PAPER = ["llama3-instruct", "llama3-v0.2", "mistral-instruct", "gemma2-instruct"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(tmp_path, *extra) -> list[str]:
    return [f"data.dataset={PREFS}", "model.name_or_path=tiny-random", f"training.output_dir={tmp_path / 'out'}",
            "data.max_samples=4", "data.max_eval_samples=2", "data.max_length=96", "data.max_prompt_length=48",
            "training.max_steps=2", "training.per_device_batch_size=2", "training.global_batch_size=2",
            "training.eval_batch_size=2", "training.ref_batch_size=2", "training.logging_steps=1", *extra]


def test_the_matrix_covers_every_shipped_preset():
    assert sorted(TRAINING_PRESETS) == sorted(preset_names())
    for name in PAPER:
        m = resolve_config(preset=name).model
        assert (m.dtype, m.gradient_checkpointing, m.mode) == ("bf16", True, "auto"), name
        assert m.attn_implementation == ("eager" if name.startswith("gemma") else "flash_attention_2"), name


@pytest.mark.parametrize("name", PAPER)
def test_one_cpu_process_trains_in_process(name):
    """The paper presets name a ZeRO-3 accelerate config; one process (no GPU, or one GPU) never relaunches."""
    cfg = resolve_config(preset=name)
    assert cfg.launch.accelerate_config == "accelerate_zero3.yaml"
    assert plan_launch(cfg, gpus=0, env={}) is None
    assert plan_launch(cfg, gpus=1, env={}) is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
@pytest.mark.parametrize("name", TRAINING_PRESETS)
def test_preset_trains_two_steps(name, mode, tmp_path, monkeypatch):
    asked = resolve_config(preset=name).model
    if asked.dtype == "bf16":
        monkeypatch.setenv("ALPHADPO_CPU_BF16", "1")
    cfg = resolve_config(preset=name, overrides=small(tmp_path, f"model.mode={mode}"))
    tr = Trainer(cfg)
    res = tr.run()
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(res.losses))), res.losses

    policy = tr.models.policy
    dtype = resolve_dtype(asked.dtype)
    if asked.dtype == "bf16":
        assert dtype == torch.bfloat16
    lm = unwrap_causal_lm(policy)
    if mode == "qlora":
        import bitsandbytes as bnb

        assert is_4bit(policy)
        compute = {m.compute_dtype for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert compute == {qlora_compute_dtype(dtype, torch.device("cpu"))}
        if asked.dtype == "bf16":
            assert compute == {torch.bfloat16}
    else:
        assert lm.get_input_embeddings().weight.dtype == dtype
        frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
        trained = {p.dtype for p in policy.parameters() if p.requires_grad}
        if mode == "full":
            assert trained == {dtype} and frozen <= {dtype}
        else:
            assert frozen == {dtype} and trained == {torch.float32}  # float32 adapters on the bf16 base

    base_attn = modeling.resolve_attn_implementation(asked.attn_implementation) or "sdpa"
    if asked.attn_implementation == "flash_attention_2":
        assert base_attn == "sdpa"
    # packed (the presets' default): the segment kernels are installed as hooks that act only on calls
    # carrying a segment plan; every other call runs the model's own attention (`base_attn`). That the
    # Gemma-2 preset's packed scores are what Gemma-2 defines (soft-cap, sliding layers) is checked on a tiny
    # Gemma-2 in tests/test_attention_models.py (here every preset runs the tiny Llama).
    assert cfg.training.packing and uses_segment_attention(lm)

    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(bool(m.gradient_checkpointing) == asked.gradient_checkpointing for m in layers)
    if asked.gradient_checkpointing:
        assert all(_recomputes_as_forward(m) for m in layers)


@pytest.mark.slow
def test_paper_preset_from_the_cli_as_a_new_user(tmp_path, monkeypatch):
    """`alphadpo train --preset llama3-v0.2 --model ... --max-steps 2`: mode auto (LoRA on one process),
    bf16, flash-attn missing -> one notice, checkpointing; trains in-process, no traceback."""
    from alphadpo_cli.models import runtime

    monkeypatch.setattr(runtime, "_NOTICES", set())
    sets = [x for s in small(tmp_path)[3:] if not s.startswith("training.max_steps") for x in ("--set", s)]
    r = CliRunner().invoke(main, ["train", "--preset", "llama3-v0.2", "--model", "tiny-random", "--dataset", str(PREFS),
                                  "--max-steps", "2", "-o", str(tmp_path / "cli"), *sets])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "launching" not in r.output
    assert r.output.count("using sdpa") == 1
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("user_rate", [None, 3e-4])
def test_a_one_device_paper_run_trains_at_the_lora_rate_and_records_it(user_rate, tmp_path):
    """llama3-v0.2 on one process: mode auto -> LoRA at 10x the paper's 1e-6 (LoRA Without Regret), or
    the user's rate; the plan names the mode, the rate and its source, the optimiser steps at that rate
    (a constant schedule without warmup: every step's logged rate is the peak) and config.yaml records both."""
    import yaml
    from rich.console import Console

    from helpers import read_metrics

    extra = ["model.dtype=fp32", "training.lr_scheduler=constant", "training.warmup_ratio=0"]
    extra += [] if user_rate is None else [f"training.learning_rate={user_rate}"]
    cfg = resolve_config(preset="llama3-v0.2", overrides=small(tmp_path, *extra))
    lr = 1e-5 if user_rate is None else user_rate
    console = Console(record=True, width=240)
    res = Trainer(cfg, console=console).run()
    assert res.steps == 2
    assert [r["learning_rate"] for r in read_metrics(tmp_path / "out")] == pytest.approx([lr, lr])
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (saved["model"]["mode"], saved["training"]["learning_rate"]) == ("lora", pytest.approx(lr))

    source = ("preset llama3-v0.2 (lora = 10x full rule)" if user_rate is None
              else "user: --set training.learning_rate")
    table = console.export_text()  # the plan printed at the start of the run
    for key, value in (("mode", "lora"), ("learning rate", f"{lr:g}"), ("learning rate source", source)):
        assert re.search(rf"│ {key} +│ {re.escape(value)} +│", table), table
    plan = Trainer(cfg).run(dry_run=True)  # (cfg as the run resolved it: the same answer)
    assert (plan.mode, plan.learning_rate, plan.learning_rate_source) == ("lora", pytest.approx(lr), source)
