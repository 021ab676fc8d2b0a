# The two commands the README opens with: `make demo` and `make test`.
VENV ?= .venv
export VENV
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint

install:
	@scripts/install.sh

demo: install
	$(VENV)/bin/calibserve demo

# Everything: lint, then the whole suite (demo world build, real vLLM CPU servers, Prometheus).
test: lint
	$(PY) -m pytest

# The inner loop: no engine, no demo-world build, nothing marked slow.
test-fast: install
	$(PY) -m pytest -m "not vllm and not demo and not realworld and not slow"

# ruff (with a complexity limit), strict mypy on the whole package, and the layer contract.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
