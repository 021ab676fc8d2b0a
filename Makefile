# The two commands the README opens with: `make demo` and `make test`.
VENV ?= .venv
export VENV
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint

install:
	@scripts/install.sh

demo: install
	$(VENV)/bin/calibserve demo

# Everything: lint, then the whole suite (demo world build, real vLLM CPU servers, Prometheus)
# on two pytest-xdist workers: the tests that start engines all on one, in order
# (testing/fixtures.py HEAVY_MARKERS), everything else on either; the slowest 25 are listed.
test: lint
	$(PY) -m pytest -n 2 --dist loadgroup --durations=25

# The inner loop: no engine, no demo-world build, nothing marked slow; three pytest-xdist
# workers (the slowest tests wait on deadlines and servers, not on the CPU).
test-fast: install
	$(PY) -m pytest -n 3 -m "not vllm and not demo and not realworld and not slow"

# ruff (with a complexity limit), strict mypy on the whole package, and the layer contract.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
