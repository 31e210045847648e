# The two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch is pinned first: on these machines 2.13.0 is a CPU build on local disk; an unpinned torch
# would pull a multi-GB CUDA build. The package itself only asks for torch>=2.4.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/palmchat demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PIP) install -q palm-rlhf-pytorch "$(TORCH)"
	$(PY) benchmarks/bench_foundation.py

clean:
	rm -rf runs .pytest_cache
