# The two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch is pinned first: on these machines 2.13.0 is a CPU build on local disk; an unpinned torch
# would pull a multi-GB CUDA build. The package itself only asks for torch>=2.4.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench bench-byom screenshots install browser clean

$(STAMP): pyproject.toml setup.py palmchat/kernels/decode_bf16.c palmchat/kernels/decode_avx2.c \
		palmchat/kernels/decode_block.h palmchat/kernels/attention_bf16.c Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,serve]"
	touch $(STAMP)

# Debian's chromium, for the browser tests only (tests/test_web.py drives it with the playwright package, no
# browser download); they are skipped where it cannot be installed (not root, not Debian), except under CI.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: could not install chromium: the browser tests will be skipped"

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/palmchat demo --out runs/demo --serve

# The second run takes the CPU-dependent tests (marker `kernels`) again as on an AVX2-only CPU: palmchat's own
# choices capped by PALMCHAT_MAX_CPU_ISA (palmchat/utils/cpu.py), ATen's and oneDNN's by their variables (with its own
# torch.compile cache: tests/conftest.py).
test: $(STAMP) browser
	$(VENV)/bin/ruff check palmchat tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests  # each test single-threaded (tests/conftest.py): one per core
	PALMCHAT_MAX_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m kernels tests

screenshots: $(STAMP) browser  # the README's docs/*.png, taken by the browser tests
	PALMCHAT_SCREENSHOTS=$(CURDIR)/docs $(PY) -m pytest -q tests/test_web.py

bench: $(STAMP)
	$(PIP) install -q palm-rlhf-pytorch "$(TORCH)"
	$(PY) benchmarks/bench_foundation.py

# bring your own model: palmchat against transformers (+peft) and llama.cpp; llama-cpp-python builds llama.cpp from
# source (18 minutes on 2 busy cores), so only this target installs it (the llama.cpp tests skip without it)
bench-byom: $(STAMP)
	$(PIP) install -q llama-cpp-python "$(TORCH)"
	$(PY) benchmarks/bench_byom.py

clean:
	rm -rf runs .pytest_cache
