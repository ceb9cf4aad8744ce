.DEFAULT_GOAL := check

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv is (re)built only when pyproject.toml changes; every target depends on it.
INSTALLED := $(VENV)/.installed

.PHONY: install
install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "govledger needs Python >= 3.11; $(PYTHON) is " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

.PHONY: run
run: $(INSTALLED)
	exec $(BIN)/govledger serve

.PHONY: migrate
migrate: $(INSTALLED)
	$(BIN)/govledger migrate

.PHONY: test
test: $(INSTALLED)
	$(BIN)/pytest

.PHONY: soak
soak: $(INSTALLED)
	$(BIN)/pytest -m soak

# The peer and plotting libraries: for the benchmarks, and for mypy to check them.
BENCH_INSTALLED := $(VENV)/.bench-installed
$(BENCH_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install -e '.[dev,bench]'
	touch $@

.PHONY: bench
bench: $(BENCH_INSTALLED)
	command -v wrk >/dev/null || { [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -qq wrk; }; }
	$(BIN)/govledger bench

.PHONY: screenshot
screenshot: $(INSTALLED)
	$(BIN)/python -m service.dashboard_screenshot docs/dashboard.png

.PHONY: fmt
fmt: $(INSTALLED)
	$(BIN)/ruff format
	$(BIN)/ruff check --fix

.PHONY: lint
lint: $(BENCH_INSTALLED)
	$(BIN)/ruff format --check
	$(BIN)/ruff check
	$(BIN)/mypy

.PHONY: check
check: lint test

.PHONY: clean
clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.data -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Separate from clean on purpose: .data is the local cluster of `make run`.
.PHONY: clean-data
clean-data: $(INSTALLED)
	$(BIN)/python -m service.pgcluster stop .data
	rm -rf .data
