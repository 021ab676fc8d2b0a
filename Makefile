# The two commands the README opens with: `make demo` and `make test`.
VENV ?= .venv
export VENV

.PHONY: install demo test lint bench

install:
	@scripts/install.sh

demo: install
	$(VENV)/bin/calibserve demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: install
	$(VENV)/bin/ruff check .
