# The README's commands. CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install test unit integration acceptance chaos fault e2e demo bench lint image clean

help:
	@echo "make demo   - run the worker on a throwaway database with a mixed workload"
	@echo "make test   - install (if needed) and run the whole test suite"
	@echo "make lint   - function length, ruff and mypy"
	@echo "make e2e    - real playbooks on a running NoETL server (NOETL_E2E_SERVER_URL, NOETL_E2E_DSN)"
	@echo "make bench  - the benchmark (docs/benchmarks.md)"
	@echo "make image  - the container image (podman; IMAGE=..., IMAGE_BASE=python:3.12-slim)"

# Install only when pyproject.toml changed: a second run is fast and needs no network.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "noetl-pgworker needs Python 3.11 or newer ($(PYTHON) is older)" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

acceptance: $(STAMP)
	$(PY) -m pytest -m acceptance $(PYTEST_ARGS)

chaos: $(STAMP)
	$(PY) -m pytest -m chaos $(PYTEST_ARGS)

# Silent network partitions (root: a network namespace and a veth pair); part of `make test`.
fault: $(STAMP)
	$(PY) -m pytest -m fault $(PYTEST_ARGS)

# Real playbooks on a running NoETL server (not part of `make test`): see docs/compatibility.md.
e2e: $(STAMP)
	@test -n "$$NOETL_E2E_SERVER_URL" -a -n "$$NOETL_E2E_DSN" || { echo "make e2e: set NOETL_E2E_SERVER_URL and NOETL_E2E_DSN to a running NoETL server and its database" >&2; exit 2; }
	$(PY) -m pytest tests/e2e -m e2e $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Benchmarks (not tests): a throwaway PostgreSQL, or NOETL_PGWORKER_DSN's server. See docs/benchmarks.md.
bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

# The container image from Containerfile, with podman. By default on a Debian base made here
# with debootstrap and wheels built on this host (no registry needed); IMAGE_BASE=python:3.12-slim
# builds on the official image instead. See scripts/image.sh.
image: $(STAMP)
	PYTHON=$(PY) scripts/image.sh

lint: $(STAMP)
	$(PY) scripts/check_function_length.py --max 60 noetl_pgworker
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
