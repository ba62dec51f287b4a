# make demo | make test | make test-gpu | make bench | make lint | make wheel-check | make docs
# — each creates .venv and installs on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-gpu bench lint wheel-check docs tox clean

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

# The package as users get it: sdist and wheel, twine check, py.typed in the wheel, the wheel in
# a fresh venv running a 2-worker shm world (.ci/wheel-check; installs the release extra).
wheel-check: setup
	bash .ci/wheel-check

# The HTML site (mkdocs.yml: docs/ and the API reference from the docstrings) into site/.
# --strict: a broken link or a reference that does not resolve fails the build.
docs: setup
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

tox: setup
	$(BIN)/tox

clean:
	rm -rf $(VENV) .tox .benchmarks *.egg-info site
