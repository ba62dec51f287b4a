# make demo | make test | make test-gpu | make bench | make lint — each creates .venv and installs on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-gpu bench lint tox clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints pin torch==2.13.0 (CPU wheel from the local index) and the test tools
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m shmrpc.demo

test: setup
	$(BIN)/python -m pytest

# The CUDA tests (tests/test_cuda.py); they skip where torch sees no GPU.
test-gpu: setup
	$(BIN)/python -m pytest -m cuda -rs tests

# BENCH_QUICK=1 make bench: a smoke test of the machinery (fewer calls, one generation).
bench: setup
	$(BIN)/python -c "import matplotlib" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	mkdir -p .benchmarks
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-columns=median,min,max,rounds \
		--benchmark-sort=name --benchmark-json=.benchmarks/latest.json
	$(BIN)/python -m bench.report .benchmarks/latest.json docs/benchmarks.md

lint: setup
	$(BIN)/ruff check shmrpc backends tests bench
	$(BIN)/ruff format --check shmrpc backends tests bench
	$(BIN)/mypy

tox: setup
	$(BIN)/tox

clean:
	rm -rf $(VENV) .tox .benchmarks *.egg-info
