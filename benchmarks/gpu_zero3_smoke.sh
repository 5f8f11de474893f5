#!/usr/bin/env bash
# DeepSpeed ZeRO-3 smoke test on one GPU (and on two, when two are visible): the tiny random model,
# four optimiser steps per run, about 3-5 minutes in all. Nothing is downloaded.
#
#   PYTHON=.venv/bin/python benchmarks/gpu_zero3_smoke.sh [OUT_DIR]
#
# Runs (fp32 unless said, so that the comparisons are tight):
#   plain         one GPU, no DeepSpeed                                   (the baseline)
#   zero3_pre     `alphadpo train --num-gpus 1` with accelerate_zero3.yaml, precomputed reference,
#                 a checkpoint at step 2 (sharded DeepSpeed layout)
#   zero3_online  the same with the online reference (an eval-only ZeRO-3 engine partitions it)
#   zero3_resume  zero3_pre's step-2 checkpoint resumed to step 4
#   zero3_bf16    bf16 (the paper's precision): the final save must gather 16-bit weights
#   zero3_2gpu    two GPUs, per-device 2 (only when two GPUs are visible)
# Checks: losses of zero3_* equal plain (rel 1e-3) and each other (rel 1e-4 where fp32 and same
# path); the resumed steps equal the uninterrupted ones; model.safetensors is a full, gathered
# state dict (no empty ZeRO placeholders) with the tiny model's keys, bf16 in the bf16 run.
# Writes OUT_DIR/summary.json; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-${OUT:-/tmp/alphadpo-zero3-smoke}}
rm -rf "$OUT"
mkdir -p "$OUT"
export ALPHADPO_CACHE="$OUT/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset LOCAL_RANK RANK WORLD_SIZE ALPHADPO_LAUNCHED ACCELERATE_GRADIENT_ACCUMULATION_STEPS || true

"$PY" - <<'EOF'
import torch, deepspeed, accelerate, transformers
assert torch.cuda.is_available(), "no CUDA GPU visible"
print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "accelerate", accelerate.__version__,
      "transformers", transformers.__version__, "GPUs:", torch.cuda.device_count(), torch.cuda.get_device_name(0))
EOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

COMMON=(--preset tiny --dataset tests/fixtures/prefs --mode full --max-steps 4
        --set data.eval_split=null --set data.max_samples=32 --set training.warmup_ratio=0
        --set training.learning_rate=1e-4 --set training.global_batch_size=8 --set training.logging_steps=1
        --set model.dtype=fp32)
ZERO3=(--set launch.accelerate_config=accelerate_zero3.yaml)

run() {
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  if ! "$PY" -m alphadpo_cli.cli train "${COMMON[@]}" -o "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1; then
    tail -60 "$OUT/$name.log"; echo "FAILED: $name"; exit 1
  fi
  echo "   ok in $((SECONDS - t0)) s"
}

run plain --set training.per_device_batch_size=4 --num-gpus 1 --set launch.accelerate_config=null
run zero3_pre "${ZERO3[@]}" --num-gpus 1 --set training.per_device_batch_size=4 --precompute-ref --set training.save_steps=2
run zero3_online "${ZERO3[@]}" --num-gpus 1 --set training.per_device_batch_size=4 --no-precompute-ref
cp -r "$OUT/zero3_pre" "$OUT/zero3_resume"
run zero3_resume "${ZERO3[@]}" --num-gpus 1 --set training.per_device_batch_size=4 --precompute-ref \
    --resume "$OUT/zero3_resume/checkpoints/step-0000002"
run zero3_bf16 "${ZERO3[@]}" --num-gpus 1 --set training.per_device_batch_size=4 --set model.dtype=bf16
if [ "$NGPU" -ge 2 ]; then
  run zero3_2gpu "${ZERO3[@]}" --num-gpus 2 --set training.per_device_batch_size=2 --set launch.main_process_port=29517
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

out = Path(sys.argv[1])
def losses(name):
    return [json.loads(l)["loss"] for l in (out / name / "metrics.jsonl").read_text().splitlines()]
def close(a, b, rel):
    return len(a) == len(b) and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-6) for x, y in zip(a, b))

summary, failures = {}, []
runs = [p.name for p in out.iterdir() if (p / "metrics.jsonl").is_file()]
for r in sorted(runs):
    summary[r] = losses(r)
    print(f"{r:14s}", [round(x, 6) for x in summary[r]])
base = summary["plain"]
checks = {
    "zero3_pre == plain (rel 1e-3)": close(summary["zero3_pre"], base, 1e-3),
    "zero3_online == zero3_pre (rel 1e-4)": close(summary["zero3_online"], summary["zero3_pre"], 1e-4),
    "zero3_resume steps 3-4 == zero3_pre (rel 1e-4)": close(summary["zero3_resume"][-2:], summary["zero3_pre"][-2:], 1e-4),
    "zero3_bf16 == plain (rel 3e-2)": close(summary["zero3_bf16"], base, 3e-2),
    "trained (loss moved)": abs(base[-1] - base[0]) > 1e-4,
}
if "zero3_2gpu" in summary:
    checks["zero3_2gpu == plain (rel 1e-3)"] = close(summary["zero3_2gpu"], base, 1e-3)

ref = load_file(str(out / "plain" / "model.safetensors"))
for name, dtype in (("zero3_pre", torch.float32), ("zero3_bf16", torch.bfloat16)):
    sd = load_file(str(out / name / "model.safetensors"))
    ok = set(sd) == set(ref) and all(sd[k].shape == ref[k].shape and sd[k].numel() > 0 for k in ref)
    checks[f"{name}: gathered full state dict, tiny model's keys"] = ok
    checks[f"{name}: saved as {dtype}"] = all(v.dtype == dtype for v in sd.values())
ck = out / "zero3_pre" / "checkpoints" / "step-0000002"
checks["zero3_pre: sealed DeepSpeed checkpoint at step 2"] = (ck / "accelerate").is_dir() and any(ck.glob("*.json"))
for k, v in checks.items():
    print(("PASS " if v else "FAIL ") + k)
    if not v:
        failures.append(k)
(out / "summary.json").write_text(json.dumps({"losses": summary, "checks": checks}, indent=2))
sys.exit(1 if failures else 0)
EOF
