.DEFAULT_GOAL := check

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv is (re)built only when pyproject.toml changes; every target depends on it.
INSTALLED := $(VENV)/.installed

.PHONY: install
install: $(INSTALLED)

$(INSTALLED): pyproject.toml client/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "govledger needs Python >= 3.11; $(PYTHON) is " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip install -e ./client
	touch $@

# PostgreSQL's server binaries for the embedded cluster (apt-get as root when missing);
# the service itself never installs system packages.
.PHONY: postgres
postgres: $(INSTALLED)
	@[ -n "$$DATABASE_URL" ] || $(BIN)/python -m service.pgcluster install >/dev/null

.PHONY: run
run: postgres
	exec $(BIN)/govledger serve

.PHONY: migrate
migrate: postgres
	$(BIN)/govledger migrate

# Debian's chromium for the dashboard's browser tests (Playwright drives it; no
# browser download of its own), installed as root when missing.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -qq chromium; }

.PHONY: test
test: postgres chromium
	$(BIN)/pytest

# LiteLLM's proxy in a venv of its own; tests/test_litellm.py runs in .venv and
# starts the proxy and the SDK driver from it.
LITELLM_VENV := .venv-litellm
LITELLM_INSTALLED := $(LITELLM_VENV)/.installed

$(LITELLM_INSTALLED): client/pyproject.toml
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install 'litellm[proxy]==1.108.7' -e './client[litellm]'
	touch $@

.PHONY: test-litellm
test-litellm: postgres $(LITELLM_INSTALLED)
	GOVLEDGER_LITELLM_VENV=$(LITELLM_VENV) $(BIN)/pytest tests/test_litellm.py

# The inner loop: everything but the slow and the browser tests.
.PHONY: test-fast
test-fast: postgres
	$(BIN)/pytest -m "not slow and not browser"

.PHONY: soak
soak: postgres
	$(BIN)/pytest -m soak

# The peer and plotting libraries, for the benchmarks only (mypy skips their imports).
BENCH_INSTALLED := $(VENV)/.bench-installed
$(BENCH_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install -e '.[dev,bench]'
	touch $@

# make bench BENCH_ARGS="keep-pace --reps 1": any scenarios and options of govledger bench.
BENCH_ARGS ?=
.PHONY: bench
bench: $(BENCH_INSTALLED)
	command -v wrk >/dev/null || { [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -qq wrk; }; }
	$(BIN)/govledger bench $(BENCH_ARGS)

.PHONY: screenshot
screenshot: $(INSTALLED)
	$(BIN)/python -m tools.screenshot docs/dashboard.png

.PHONY: fmt
fmt: $(INSTALLED)
	$(BIN)/ruff format
	$(BIN)/ruff check --fix

.PHONY: lint
lint: $(INSTALLED)
	$(BIN)/ruff format --check
	$(BIN)/ruff check
	$(BIN)/mypy

.PHONY: check
check: lint test

.PHONY: clean
clean:
	rm -rf $(VENV) $(LITELLM_VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.data -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Separate from clean on purpose: .data is the local cluster of `make run`.
.PHONY: clean-data
clean-data: $(INSTALLED)
	$(BIN)/python -m service.pgcluster remove .data
	rm -rf .data
