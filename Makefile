# alignfuse: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev,ray
STAMP  := $(VENV)/.installed-$(EXTRAS)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test test-fast lint typecheck demo bench sysdeps clean docker-test docker-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

# System packages the tests drive for real: Chromium (web page) and docker-compose (compose validation).
sysdeps:
	bash scripts/install-browser.sh
	bash scripts/install-tools.sh

# Lint, the import contract (pyproject [tool.importlinter]), type-check, the whole offline test suite
# (browser, crash and demo tests included), then the deployment for real (docker-test; it says so and skips
# where no Docker engine can be started, except under CI).
test: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q
	$(MAKE) docker-test

# Build the CPU image, run the compose stack, search through it, restart it, run a tools command, tear down.
docker-test: install
	PYTHON=$(abspath $(BIN)/python) bash scripts/docker-test.sh

# Lint the Dockerfile (hadolint) and validate the compose file (docker-compose v1 config) without an engine.
docker-check: install sysdeps
	$(BIN)/hadolint docker/Dockerfile
	cd docker && docker-compose -f compose.yaml config -q && docker-compose -f compose.yaml --profile gpu --profile tools config -q

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
	$(BIN)/python bench/overload.py
	$(BIN)/python bench/vilt_cost.py
	$(BIN)/python bench/ray_build.py

clean:
	rm -rf demo-data .pytest_cache .ruff_cache .mypy_cache
