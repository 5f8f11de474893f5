"""Throughput in every training run: the FLOPs formula by hand on a tiny config, the GPU peak table,
the CPU peak measured once, and tokens/s, pairs/s and MFU in metrics.jsonl and train_results.json."""

from __future__ import annotations

import json

import pytest
import torch

from alphadpo_cli import hardware
from alphadpo_cli.config import resolve_config
from alphadpo_cli.train.throughput import flops_per_token, matmul_params, pair_tokens, run_throughput


def _llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_matmul_params_and_flops_per_token_by_hand():
    # hidden 16, 4 heads of 4, 2 kv heads: q 16x16, k 16x8, v 16x8, o 16x16; MLP gate/up/down 16x24 each
    per_layer = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 24
    head = 100 * 16  # the LM head; the input embedding (also 100 x 16) is not counted
    n = 2 * per_layer + head
    assert matmul_params(_llama(tie=True)) == n  # tied: the embedding counts once, as the head
    assert matmul_params(_llama(tie=False)) == n  # untied: the head, never the input embedding
    assert flops_per_token(n, "full", online_reference=False) == 6 * n
    assert flops_per_token(n, "lora", online_reference=False) == 4 * n
    assert flops_per_token(n, "qlora", online_reference=True) == 6 * n  # 4N + 2N for the reference forward
    assert flops_per_token(n, "full", online_reference=True) == 8 * n


def test_lora_weights_are_not_counted():
    from peft import LoraConfig, get_peft_model

    model = _llama(tie=True)
    n = matmul_params(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert matmul_params(peft) == n


def test_pair_tokens_are_prompt_twice_plus_both_responses():
    data = {"prompt_ids": [[1, 2, 3], [4]], "chosen_ids": [[5, 6], [7, 8, 9]], "rejected_ids": [[1], [2, 3]]}
    assert pair_tokens(data).tolist() == [2 * 3 + 2 + 1, 2 * 1 + 3 + 2]


def test_gpu_peaks_by_name_and_unknown_ones_are_none():
    assert hardware.gpu_dense_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert hardware.gpu_dense_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert hardware.gpu_dense_peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert hardware.gpu_dense_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert hardware.gpu_dense_peak_tflops("NVIDIA A10G", "bf16") is None  # not an A10
    assert hardware.gpu_dense_peak_tflops("Tesla T4", "bf16") is None


def test_the_cpu_peak_is_measured_once_and_emulated_bf16_is_not_measured(monkeypatch):
    hardware.cpu_matmul_peak.cache_clear()
    monkeypatch.setenv("ALPHADPO_CPU_BF16", "0")
    assert hardware.cpu_matmul_peak("bf16").flops is None
    before = torch.random.get_rng_state()
    first = hardware.cpu_matmul_peak("fp32")
    assert first.flops > 0 and hardware.cpu_matmul_peak("fp32") is first  # once per process
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's RNG untouched
    tp = run_throughput(_llama(tie=True), mode="lora", online_reference=False, device=torch.device("cpu"),
                        dtype=torch.float32, processes=2)
    assert tp.peak_flops == 2 * first.flops
    assert tp.mfu(1000.0) == pytest.approx(tp.flops_per_token * 1000 / tp.peak_flops)


def test_tokens_per_second_and_mfu_in_metrics_and_results(tmp_path, prefs_dir, one_torch_thread):
    from alphadpo_cli.train.trainer import train

    out = tmp_path / "run"
    cfg = resolve_config(preset="tiny", overrides=[
        f"data.dataset={prefs_dir}", f"training.output_dir={out}", "training.max_steps=2", "data.max_samples=8",
        "data.max_eval_samples=4", "training.logging_steps=1"])
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["pairs_per_second"] > 0 and 0 < r["mfu"] < 1
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["tokens_per_second"] > 0 and saved["mfu"] > 0 and saved["mfu"] == pytest.approx(result.mfu)
    tp = saved["throughput"]
    assert tp["flops_per_token"] == 4 * tp["n_params"]  # the tiny preset: LoRA, precomputed reference
    # every pair's own tokens (prompt twice, no padding), as the steps took them: 8 pairs a step, 2 steps
    from alphadpo_cli.models.pretrained import load_tokenizer
    from alphadpo_cli.train.trainer import Trainer

    split, _ = Trainer(cfg).load_data(load_tokenizer(cfg.model))
    assert saved["tokens"] == result.tokens == 2 * int(pair_tokens(split.dataset).sum())
    assert saved["mfu"] == pytest.approx(tp["flops_per_token"] * saved["tokens_per_second"] / tp["peak_flops"])
