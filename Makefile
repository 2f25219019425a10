# alignfuse: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.installed-$(EXTRAS)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test test-fast lint typecheck demo bench sysdeps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

# System packages the tests drive for real: Chromium (web page) and docker-compose (compose validation).
sysdeps:
	bash scripts/install-browser.sh
	bash scripts/install-tools.sh

# Lint, the import contract (pyproject [tool.importlinter]), type-check, then the whole offline test suite
# (browser, crash and demo tests included).
test: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow and not browser"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

typecheck: install
	$(BIN)/mypy

# Generate the demo scenes (if absent), build the demo collection with the shipped models, serve on :8000.
demo: install
	$(BIN)/alignfuse demo $(DEMO_ARGS)

bench: install
	$(BIN)/python bench/build.py
	$(BIN)/python bench/rerank.py
	$(BIN)/python bench/service.py

clean:
	rm -rf demo-data .pytest_cache .ruff_cache .mypy_cache
