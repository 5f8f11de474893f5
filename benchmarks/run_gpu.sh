#!/usr/bin/env bash
# GPU side of the benchmark: one H100 (or H200), a randomly initialised model with the
# Llama-3-8B configuration (vocabulary 128,256), bf16 LoRA r16 all-linear, 2 pairs of 1024 tokens
# per step (prompt 256 + response 768), sigmoid DPO in TRL 1.16 DPOTrainer and in alphadpo, plus
# alphadpo's alpha-DPO. Each system runs in its own process (about 1 minute each, ~6 in all).
#
#   bash benchmarks/run_gpu.sh                 # default systems
#   SYSTEMS=trl-precompute,alphadpo bash benchmarks/run_gpu.sh
#
# Prints the table (tokens/s, pairs/s, peak torch.cuda.max_memory_allocated, MFU vs the dense
# bf16 peak) and writes benchmarks/results/llama3-8b-<time>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/bench_dpo.py --workload llama3-8b \
    --steps "${STEPS:-5}" --warmup "${WARMUP:-2}" --timeout "${TIMEOUT:-300}" \
    ${SYSTEMS:+--systems "$SYSTEMS"} "$@"
