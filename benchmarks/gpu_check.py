#!/usr/bin/env python
"""The Python half of benchmarks/gpu_check.sh: each subcommand does one check and prints one JSON
object (its numbers) on its last line; `record` files a section's outcome into the results file.

    gpu_check.py env                                   versions, GPU, whether the CPU has bf16 instructions,
                                                       which optional packages exist
    gpu_check.py make-model DIR [--size small|tiny]    a random Llama + the tiny byte tokenizer, saved
                                                       as a plain transformers directory (no download)
    gpu_check.py check-train RUN_DIR [--adapter] [--dtype bf16]
                                                       a finished `alphadpo train` run: losses finite and
                                                       moving, the saved files, the step rates
    gpu_check.py packed-vs-padded --model DIR --device cuda --dtype bf16 [--tol 2e-2]
                                                       per-sequence log-probs of packed (varlen
                                                       FlashAttention on CUDA) vs padded batches
    gpu_check.py vllm --model DIR                      a few greedy answers through vLLM vs transformers
    gpu_check.py record RESULTS NAME RC SECONDS LOG    append a section (pass / fail / skip) to RESULTS

Exit status 77 means "skipped" (a package or the GPU is missing); the reason is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SKIP = 77


def _emit(obj: dict) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _skip(reason: str):
    print(f"SKIP: {reason}", flush=True)
    sys.exit(SKIP)


# ---------------------------------------------------------------------------------------------


def cmd_env(_a) -> None:
    import importlib.metadata as md
    import platform

    import torch

    from alphadpo_cli.hardware import cpu_bf16

    bf16 = cpu_bf16()  # the trainer's and bench_dpo.py's one detection: emulated bf16 is slow on a CPU
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpu_count": torch.cuda.device_count(), "cpu_native_bf16": bf16.native, "cpu_bf16": bf16.reason}
    out["pythonpath"] = os.environ.get("PYTHONPATH")  # the kit's --target folder first (benchmarks/gpu_kit.sh)
    for pkg in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash_attn", "vllm", "trl",
                "datasets", "numpy", "pyarrow", "fsspec", "huggingface_hub", "pydantic", "typing_extensions"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        out["torch_varlen_attn"] = True
    except ImportError:
        out["torch_varlen_attn"] = False
    _emit(out)


SIZES = {  # head_dim 64 (FlashAttention and vLLM take it), GQA 2:1 like Llama-3
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
}


def cmd_make_model(a) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alphadpo_cli.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.08,  # sharper than 0.02: next-token distributions far from uniform
                      **SIZES[a.size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(a.dir, safe_serialization=True)
    tok.save_pretrained(a.dir)
    _emit({"dir": a.dir, "size": a.size, "parameters": sum(p.numel() for p in model.parameters())})


def cmd_check_train(a) -> None:
    run = Path(a.run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    res = json.loads((run / "train_results.json").read_text()) if (run / "train_results.json").is_file() else {}
    out = {"steps": len(rows), "losses": losses, "pairs_per_second": rows[-1].get("pairs_per_second"),
           "tokens_per_second": rows[-1].get("tokens_per_second"), "seconds": res.get("seconds"),
           "eval_accuracy_after": (res.get("eval_after") or {}).get("accuracy")}
    problems = []
    if not rows or not all(math.isfinite(x) for x in losses):
        problems.append("non-finite or no losses")
    if len(losses) > 1 and abs(losses[-1] - losses[0]) < 1e-6:
        problems.append("the loss did not move")
    if a.adapter:
        if not (run / "adapter_model.safetensors").is_file():
            problems.append("no adapter_model.safetensors")
    else:
        from safetensors.torch import load_file

        f = run / "model.safetensors"
        if not f.is_file():
            problems.append("no model.safetensors")
        else:
            sd = load_file(str(f))
            out["saved_tensors"] = len(sd)
            out["saved_dtypes"] = sorted({str(v.dtype) for v in sd.values()})
            if any(v.numel() == 0 for v in sd.values()):
                problems.append("empty tensors in the saved model (ZeRO-3 placeholders: not gathered)")
            if a.dtype == "bf16" and out["saved_dtypes"] != ["torch.bfloat16"]:
                problems.append(f"saved as {out['saved_dtypes']}, not bf16")
    out["problems"] = problems
    _emit(out)
    sys.exit(1 if problems else 0)


def cmd_packed_vs_padded(a) -> None:
    """The same pairs through the padded [2B, T] layout (the model's own attention) and through one
    packed row (segment attention: FlashAttention-2 varlen on CUDA in bf16/fp16, per-segment SDPA
    elsewhere), with and without prefix sharing. Compared: each sequence's mean per-token log-prob."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphadpo_cli.logps.layouts import PairCollator
    from alphadpo_cli.data import TokenizeSettings, tokenize_split
    from alphadpo_cli.logps.sequence import SequenceLogps, scorer_inputs
    from alphadpo_cli.logps.layouts import PackedPairCollator
    from alphadpo_cli.kernels.segment_attention import describe_packed_kernel, install_segment_attention

    if a.device == "cuda" and not torch.cuda.is_available():
        _skip("no CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn).to(a.device).eval()
    split = tokenize_split(str(ROOT / "tests" / "fixtures" / "prefs"), "train", tok, TokenizeSettings(512, 256),
                           max_samples=a.pairs, use_cache=False)
    rows = [split.dataset[i] for i in range(len(split))]
    scorer = SequenceLogps(model)
    dev = torch.device(a.device)
    to = lambda b: {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()}  # noqa: E731
    with torch.no_grad():
        padded = to(PairCollator(tok.pad_token_id)(rows))
        s_pad, c_pad = scorer(**scorer_inputs(padded))
        kernel = install_segment_attention(model)
        out = {"device": a.device, "dtype": a.dtype, "padded_attention": a.attn, "segment_attention": kernel,
               "pairs": len(rows), "tolerance_mean_logp": a.tol}
        out["packed_kernel"] = describe_packed_kernel(
            dev, dtype, softcap=getattr(model.config, "attn_logit_softcapping", None),
            window=getattr(model.config, "sliding_window", None))
        worst = 0.0
        for share in (False, True):
            packed = to(PackedPairCollator(tok.pad_token_id, prefix_sharing=share)(rows))
            s_pack, c_pack = scorer(**scorer_inputs(packed))
            assert torch.equal(c_pack.cpu(), c_pad.cpu()), "token counts differ"
            diff = ((s_pack - s_pad).abs() / c_pad).max().item()
            out[f"max_abs_diff_mean_logp_prefix_sharing_{share}"] = diff
            worst = max(worst, diff)
        out["mean_logp_padded"] = (s_pad / c_pad).mean().item()
    out["max_abs_diff_mean_logp"] = worst
    out["pass"] = worst <= a.tol
    _emit(out)
    sys.exit(0 if out["pass"] else 1)


def cmd_vllm(a) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        _skip("vllm is not installed")
    if not torch.cuda.is_available():
        _skip("no CUDA GPU")
    from alphadpo_cli.evaluation.generate import ChatGenerator, Decoding

    prompts = [[{"role": "user", "content": q}] for q in
               ("Name three colours.", "What is 2 + 2?", "Write a haiku about rain.", "Say hello in French.")]
    dec = Decoding(temperature=0.0, max_new_tokens=a.max_new_tokens)
    out = {}
    answers = {}
    for backend in ("vllm", "transformers"):
        gen = ChatGenerator(a.model, decoding=dec, backend=backend, dtype="bf16")
        t = time.perf_counter()
        gen.load()
        load = time.perf_counter() - t
        t = time.perf_counter()
        got = gen.generate(prompts)
        dt = time.perf_counter() - t
        answers[backend] = got
        out[backend] = {"load_seconds": load, "seconds": dt, "tokens": sum(x.tokens for x in got),
                        "tokens_per_second": sum(x.tokens for x in got) / max(dt, 1e-9)}
        gen.close()
        del gen
        torch.cuda.empty_cache()
    same = [v.text == h.text for v, h in zip(answers["vllm"], answers["transformers"])]
    out["greedy_answers_identical"] = f"{sum(same)}/{len(same)}"  # bf16 kernels differ: informative only
    out["sample"] = answers["vllm"][0].text[:200]
    _emit(out)
    sys.exit(0 if out["vllm"]["tokens"] > 0 else 1)


def cmd_record(a) -> None:
    results = Path(a.results)
    data = json.loads(results.read_text()) if results.is_file() else {"sections": {}}
    log = Path(a.log).read_text(errors="replace") if Path(a.log).is_file() else ""
    rc = int(a.rc)
    status = "pass" if rc == 0 else "skip" if rc == SKIP else "timeout" if rc in (124, 137) else "fail"
    details = None
    for line in reversed(log.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                details = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    entry = {"status": status, "rc": rc, "seconds": round(float(a.seconds), 1), "details": details}
    if a.note:
        entry["note"] = a.note
    if status == "skip":
        entry["reason"] = next((ln[5:].strip() for ln in log.splitlines() if ln.startswith("SKIP:")), "")
    if status in ("fail", "timeout"):
        entry["log_tail"] = log[-3000:]
    data["sections"][a.name] = entry
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=2, default=str))
    print(f"{a.name:16s} {status:7s} {entry['seconds']:7.1f} s" + (f"  ({entry.get('reason')})" if status == "skip" else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    m = sub.add_parser("make-model")
    m.add_argument("dir")
    m.add_argument("--size", choices=sorted(SIZES), default="small")
    c = sub.add_parser("check-train")
    c.add_argument("run")
    c.add_argument("--adapter", action="store_true")
    c.add_argument("--dtype")
    k = sub.add_parser("packed-vs-padded")
    k.add_argument("--model", required=True)
    k.add_argument("--device", default="cuda")
    k.add_argument("--dtype", default="bf16")
    k.add_argument("--attn", default="sdpa", help="the padded path's attention (sdpa, or flash_attention_2)")
    k.add_argument("--pairs", type=int, default=8)
    k.add_argument("--tol", type=float, default=2e-2, help="max |Δ mean per-token log-prob| per sequence, nats")
    v = sub.add_parser("vllm")
    v.add_argument("--model", required=True)
    v.add_argument("--max-new-tokens", type=int, default=64)
    r = sub.add_parser("record")
    for name in ("results", "name", "rc", "seconds", "log"):
        r.add_argument(name)
    r.add_argument("--note")
    a = p.parse_args(argv)
    {"env": cmd_env, "make-model": cmd_make_model, "check-train": cmd_check_train,
     "packed-vs-padded": cmd_packed_vs_padded, "vllm": cmd_vllm, "record": cmd_record}[a.cmd](a)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
