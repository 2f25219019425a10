# alignfuse: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev,ray
STAMP  := $(VENV)/.installed-$(EXTRAS)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test test-fast lint typecheck demo bench bench-gpu bench-peers train-gpu sysdeps clean docker-test docker-check

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

# Generate the demo scenes (if absent), build the two demo collections (ALBEF->ALBEF and CLIP->ALBEF) with the
# shipped models, print truth-aware results and measured suggestions, serve on :8000.
demo: install
	$(BIN)/alignfuse demo $(DEMO_ARGS)

bench: install
	$(BIN)/python bench/build.py
	$(BIN)/python bench/rerank.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/overload.py
	$(BIN)/python bench/vilt_cost.py
	$(BIN)/python bench/ray_build.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/rerank_storage.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/cost_n.py
	$(BIN)/python bench/cpu.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/int8_split.py
	$(BIN)/python bench/ann.py
	$(BIN)/python bench/incremental.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/perception.py
	$(BIN)/python bench/eval_scenes.py

# clip-retrieval and infinity side by side (each installed in its own venv under $$ALIGNFUSE_PEERS_DIR, default
# /work/peers; ~12 GB, from the registries); bench/peers.py records a peer it cannot find as skipped.
bench-peers: install
	bash scripts/peers-venv.sh
	$(BIN)/python bench/peers.py

# The GPU benchmark (bench/gpu.py, hard budget < 8 min): ViT build, ALBEF rerank (bf16/fp32, K/V cache), faiss-gpu vs
# CPU search at 1M, each against the card's measured ceiling. Installs the `gpu` extra into its own venv .venv-gpu
# (faiss-gpu and faiss-cpu overwrite each other); PYTHON_GPU=python3 uses an interpreter as it is (offline GPU
# machines). Writes bench/results/gpu-<card name>.json.
bench-gpu:
	bash scripts/bench-gpu.sh $(BENCH_GPU_ARGS)

# The shipped scenes-ALBEF recipe (runs L + M + N) on one GPU (~10 min): data, three stages of MINUTES each (default 3),
# comparison with the shipped weights on the validation splits (scripts/train-gpu.sh; OUT=runs/gpu). TOY=1 DEVICE=cpu
# runs it in seconds.
train-gpu: install
	PYTHON=$(abspath $(BIN)/python) bash scripts/train-gpu.sh

clean:
	rm -rf demo-data .pytest_cache .ruff_cache .mypy_cache
