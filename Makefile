# Two commands for a fresh machine: `make quickstart` and `make test`.
# The constraints file pins torch to the CPU wheel this machine has on disk.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: install install-dev quickstart test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(PIP) -e .

install-dev: $(BIN)/python
	$(PIP) -e ".[dev]"

quickstart: install
	$(BIN)/offpolicy train recipes/quickstart.yaml

test: install-dev
	$(BIN)/python -m pytest -q

test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow"

# Short benchmarks (~8-12 min on 2 cores): write benchmarks/results/*.json ("short": true); the full
# versions, their commands and result tables: docs/benchmarks.md.
bench: install-dev
	$(PIP) -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_generation.py --short
	$(BIN)/python benchmarks/bench_buffer.py --short
	$(BIN)/python benchmarks/bench_reuse.py --short --fresh
	$(BIN)/python benchmarks/bench_run_scale.py --short
	$(BIN)/python benchmarks/bench_shared_prompt.py --short
	$(BIN)/python benchmarks/bench_trl.py --short

clean:
	rm -rf $(VENV) runs .pytest_cache
