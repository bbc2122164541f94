# Two commands do all set-up on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on PyPI; on a CUDA or Intel GPU machine install that platform's torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= The quick brown fox

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/inferq --log-level INFO generate --prompt "$(PROMPT)" --prompt "def fibonacci(n):" --max-tokens 32

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/cpu_engine_vs_hf.py

clean:
	rm -rf $(VENV)
