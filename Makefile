# Two entry points for a fresh machine (README quick start):
#   make demo   installs what it needs, then runs the offline noisy-preference comparison
#   make test   installs what it needs, then runs the whole test suite (what CI runs)
# torch is pinned to the CPU wheel first: a looser requirement could pull a multi-GB CUDA build.
# On a GPU machine, install the torch build you want into .venv first; `make` keeps it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.hf_snr-installed

export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo lint test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,recipes,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/compare.py --config recipes/configs/demo.yaml

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra

test-fast: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/dpo_overhead.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
