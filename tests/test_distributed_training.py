"""Two processes (accelerate, gloo, CPU) train like one process with the same global batch.

`alphadpo train --num-gpus 2` on a machine without GPUs relaunches itself under `accelerate launch`
as two CPU processes; accelerate shards each micro-batch of 4 pairs as 2 + 2 across the ranks
(SeedableRandomSampler, batches interleaved), so the single-process run with per-device 4 and the
two-process run with per-device 2 see the same pairs per micro-batch and per optimiser step. Their
loss sequences must agree to float32 rounding, once with LoRA and once with full fine-tuning.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphadpo_cli.config import resolve_config
from alphadpo_cli.train.trainer import train
from helpers import free_port, read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
COMMON = [
    "data.eval_split=null", "data.max_samples=32", f"training.max_steps={STEPS}", "training.warmup_ratio=0",
    "training.global_batch_size=8", "training.logging_steps=1",
]
MODES = {
    # LoRA: the reference is the policy with adapters disabled, run online through the DDP model
    "lora": ["model.mode=lora", "training.precompute_ref=false"],
    # full fine-tuning: a separate frozen reference, precomputed on both ranks (half each) and gathered
    "full": ["model.mode=full", "training.precompute_ref=true", "training.learning_rate=1e-4"],
}


def _reference_cache(cache: Path):
    from safetensors.torch import load_file

    files = sorted(cache.glob("reference/*/logps.safetensors"))
    return load_file(str(files[0])) if files else None


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_processes_train_like_one(tmp_path, prefs_dir, mode, monkeypatch):
    sets = COMMON + MODES[mode]

    # one process, per-device 4: micro-batches of 4 pairs, accumulation 2
    monkeypatch.setenv("ALPHADPO_CACHE", str(tmp_path / "cache-1"))
    single_out = tmp_path / "single"
    cfg = resolve_config(preset="tiny", overrides=[f"data.dataset={prefs_dir}", f"training.output_dir={single_out}",
                                                   "training.per_device_batch_size=4", *sets])
    single = train(cfg)
    assert len(single.losses) == STEPS

    # two processes, per-device 2: the same micro-batches split 2 + 2, accumulation 2
    two_out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ALPHADPO_LAUNCHED")}
    env.update({"ALPHADPO_CACHE": str(tmp_path / "cache-2"), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
                "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "alphadpo_cli.cli", "train", "--preset", "tiny", "--dataset", str(prefs_dir),
           "-o", str(two_out), "--num-gpus", "2", "--set", f"launch.main_process_port={free_port()}",
           "--set", "training.per_device_batch_size=2"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "accelerate.commands.launch" in proc.stderr and "--num_processes 2" in proc.stderr

    one, two = read_metrics(single_out), read_metrics(two_out)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))  # logged once (rank 0), every step
    assert all(m["pairs_per_second"] > 0 for m in two)
    for a, b in zip(one, two):
        assert b["learning_rate"] == a["learning_rate"]  # scheduler stepped once per optimiser step
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "margin/mean",
                    "normalizer/mu", "normalizer/sigma", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (mode, a["step"], key)
    losses_two = [m["loss"] for m in two]
    assert losses_two == pytest.approx(single.losses, rel=1e-4)
    assert losses_two[-1] != pytest.approx(losses_two[0], abs=1e-4)  # it trained
    print(f"\n{mode}: one process {single.losses}\n{mode}: two processes {losses_two}")

    if mode == "full":
        # the sharded precompute gathers the same reference log-probs as the single process
        ref1, ref2 = _reference_cache(tmp_path / "cache-1"), _reference_cache(tmp_path / "cache-2")
        assert ref1 is not None and ref2 is not None
        for k in ref1:
            torch.testing.assert_close(ref2[k], ref1[k], rtol=1e-5, atol=1e-5)
        assert (two_out / "model.safetensors").is_file()
    else:
        assert (two_out / "adapter_model.safetensors").is_file()
