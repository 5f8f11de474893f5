#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 10 minutes on one GPU (H100/H200), into ONE results
# file. Nothing is downloaded: the models are random (a small Llama written by gpu_check.py, the tiny
# test model, the random Llama-3-8B of the benchmark), the data tests/fixtures/prefs.
#
#   PYTHON=python3 bash benchmarks/gpu_check.sh [RESULTS.json]        # on a GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --cpu-smoke   # every CPU-runnable part, here
#
# Sections (each with its own time limit; one that needs a missing package is recorded as "skip"):
#   env          versions; which of deepspeed, bitsandbytes, flash_attn, vllm, trl are installed
#   qlora        `alphadpo train --mode qlora` (bitsandbytes 4-bit NF4) on the small Llama, 3 steps
#   preset       `alphadpo train --preset llama3-v0.2` as it ships (LoRA, bf16, gradient checkpointing,
#                FlashAttention 2, global batch 128) with the small Llama swapped in, 3 steps
#   packed       packed rows (FlashAttention-2 varlen) vs padded batches: every sequence's mean per-token
#                log-prob within 2e-2 nats in bf16 (and 1e-4 in fp32: per-segment SDPA vs padded SDPA)
#   zero3        one GPU, `--num-gpus 1` with accelerate_zero3.yaml, full fine-tuning, bf16, 4 steps: the
#                gathered 16-bit save (ZERO3_SMOKE=full runs benchmarks/gpu_zero3_smoke.sh instead, 3-5 min)
#   vllm         greedy answers of the small Llama through vLLM and transformers (only with vllm installed)
#   bench        benchmarks/run_gpu.sh: tokens/s, peak memory, MFU, alphadpo against TRL (random
#                Llama-3-8B, bf16 LoRA); SYSTEMS=... STEPS=... pass through
# --cpu-smoke runs the same sections on the CPU where they can run (see each one below): qlora on the
# CPU (bitsandbytes' CPU 4-bit kernels), the preset at batch 4 and length 256, packed vs padded through
# per-segment SDPA, ZeRO-3 as one DeepSpeed CPU process (DS_ACCELERATOR=cpu), the benchmark's CPU smoke
# workload (llama-tiny-cpu); vllm is skipped.
# Needs the project's dependencies (pip install -e '.[dev]' or their wheels: datasets, peft, ...); the
# optional ones (deepspeed, bitsandbytes, flash_attn, vllm, trl) are looked for and their sections skipped
# without them. Logs stay in the work dir with KEEP=1; failed sections carry their log's tail anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODE=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=cpu; shift; fi
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${1:-benchmarks/results/gpu-check-$MODE-$STAMP.json}
BUDGET=${BUDGET:-570}  # seconds for everything; a section that cannot fit any more is skipped
WORK=$(mktemp -d -t alphadpo-gpu-check-XXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
export ALPHADPO_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset LOCAL_RANK RANK WORLD_SIZE ALPHADPO_LAUNCHED ACCELERATE_GRADIENT_ACCUMULATION_STEPS || true
if [ "$MODE" = cpu ]; then export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu; fi
rm -f "$RESULTS"
T0=$SECONDS
echo "gpu_check ($MODE): results -> $RESULTS, work dir $WORK"

# section NAME LIMIT_SECONDS COMMAND...: runs it with a time limit, files its outcome and numbers
section() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    echo "SKIP: the ${BUDGET} s budget is spent" >"$WORK/$name.log"
    "$PY" benchmarks/gpu_check.py record "$RESULTS" "$name" 77 0 "$WORK/$name.log"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  "$PY" benchmarks/gpu_check.py record "$RESULTS" "$name" "$rc" "$((SECONDS - t))" "$WORK/$name.log" \
      ${NOTE:+--note "$NOTE"}
}
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 77)" 2>/dev/null; }
skip_unless() { if ! has "$1"; then echo "SKIP: $1 is not installed"; exit 77; fi; }
export -f has skip_unless
export PY

TRAIN=("$PY" -m alphadpo_cli.cli train --dataset tests/fixtures/prefs --set data.max_samples=32
       --set training.logging_steps=1 --set training.report_to=none)
SMALL="$WORK/small-llama"

section env 60 "$PY" benchmarks/gpu_check.py env
section model 120 "$PY" benchmarks/gpu_check.py make-model "$SMALL" --size "$([ $MODE = gpu ] && echo small || echo tiny)"

# qlora: bitsandbytes NF4 base, LoRA adapters, the reference = the 4-bit base with adapters disabled
NOTE=$([ $MODE = cpu ] && echo "CPU: bitsandbytes CPU 4-bit kernels") \
section qlora 150 bash -c "skip_unless bitsandbytes && ${TRAIN[*]} --preset tiny --model '$SMALL' --mode qlora \
    --set model.dtype=auto --max-steps 3 -o '$WORK/qlora' && \"\$PY\" benchmarks/gpu_check.py check-train '$WORK/qlora' --adapter"

# preset: the paper preset as it ships; on CPU at batch 4 and length 256
PRESET_CPU=""
[ $MODE = cpu ] && PRESET_CPU="--set training.global_batch_size=4 --set data.max_length=256 --set data.max_prompt_length=128"
NOTE=$([ $MODE = cpu ] && echo "CPU: global batch 4, max_length 256 (else as shipped)") \
section preset 240 bash -c "${TRAIN[*]} --preset llama3-v0.2 --model '$SMALL' --max-steps 3 $PRESET_CPU \
    -o '$WORK/preset' && grep -iE 'attention|flash' '$WORK/preset.log' | head -3; \
    \"\$PY\" benchmarks/gpu_check.py check-train '$WORK/preset' --adapter"

# packed vs padded: bf16 (varlen FlashAttention on CUDA) and fp32 (per-segment SDPA)
DEV=$([ $MODE = gpu ] && echo cuda || echo cpu)
section packed_bf16 120 "$PY" benchmarks/gpu_check.py packed-vs-padded --model "$SMALL" --device "$DEV" --dtype bf16 --tol 2e-2
section packed_fp32 120 "$PY" benchmarks/gpu_check.py packed-vs-padded --model "$SMALL" --device "$DEV" --dtype fp32 --tol 1e-4

# zero3: one process (one GPU, or one DeepSpeed CPU process), full fine-tuning, bf16, the gathered save
if [ "${ZERO3_SMOKE:-}" = full ] && [ $MODE = gpu ]; then
  section zero3 330 bash -c "skip_unless deepspeed && PYTHON=\"\$PY\" bash benchmarks/gpu_zero3_smoke.sh '$WORK/zero3-smoke' \
      && cat '$WORK/zero3-smoke/summary.json' | \"\$PY\" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))'"
else
  NOTE=$([ $MODE = cpu ] && echo "CPU: one DeepSpeed process, DS_ACCELERATOR=cpu") \
  section zero3 240 bash -c "skip_unless deepspeed && ${TRAIN[*]} --preset tiny --mode full --num-gpus 1 \
      --set launch.accelerate_config=accelerate_zero3.yaml --set model.dtype=bf16 --set training.learning_rate=1e-4 \
      --set training.global_batch_size=8 --set training.per_device_batch_size=4 --max-steps 4 -o '$WORK/zero3' \
      && \"\$PY\" benchmarks/gpu_check.py check-train '$WORK/zero3' --dtype bf16"
fi

section vllm 180 "$PY" benchmarks/gpu_check.py vllm --model "$SMALL"

# bench: tokens/s, peak memory, MFU; TRL rows only where trl is installed
if [ $MODE = gpu ]; then
  SYS=${SYSTEMS:-$(has trl && echo trl-precompute,alphadpo || echo alphadpo)}
  section bench 300 bash -c "SYSTEMS='$SYS' STEPS=${STEPS:-3} WARMUP=${WARMUP:-1} PYTHON=\"\$PY\" bash benchmarks/run_gpu.sh \
      --timeout 140 --out '$WORK/bench' && \"\$PY\" -c 'import json,glob,sys; f=sorted(glob.glob(\"$WORK/bench/*.json\"))[-1]; print(json.dumps(json.load(open(f))))'"
else
  SYS=${SYSTEMS:-$(has trl && echo trl-precompute,alphadpo || echo alphadpo)}
  NOTE="CPU: workload llama-tiny-cpu" \
  section bench 240 bash -c "\"\$PY\" benchmarks/bench_dpo.py --workload llama-tiny-cpu --systems '$SYS' --out '$WORK/bench' \
      && \"\$PY\" -c 'import json,glob,sys; f=sorted(glob.glob(\"$WORK/bench/*.json\"))[-1]; print(json.dumps(json.load(open(f))))'"
fi

"$PY" - "$RESULTS" "$MODE" "$((SECONDS - T0))" <<'EOF'
import json, sys
path, mode, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.load(open(path))
data.update({"mode": mode, "seconds": secs})
counts = {}
for s in data["sections"].values():
    counts[s["status"]] = counts.get(s["status"], 0) + 1
data["summary"] = counts
json.dump(data, open(path, "w"), indent=2, default=str)
print(f"gpu_check ({mode}) in {secs} s: {counts}; results in {path}")
sys.exit(1 if counts.get("fail") or counts.get("timeout") else 0)
EOF
