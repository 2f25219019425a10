#!/usr/bin/env bash
# `make bench-gpu`: the GPU benchmark (bench/gpu.py: ViT build, ALBEF rerank, faiss-gpu vs CPU search, each
# against the card's measured ceiling; under 8 minutes) in its own venv with the `gpu` extra (faiss-gpu),
# never in the project's CPU venv: faiss-cpu and faiss-gpu install the same `faiss/` package and overwrite
# each other. Arguments go to bench/gpu.py (e.g. `--toy --device cuda` for a one-minute smoke run).
#
#   GPU_VENV=dir      the venv to create/use (default .venv-gpu); installed once, again when pyproject changes
#   PYTHON_GPU=path   use this interpreter as it is, installing nothing (a GPU machine without the package
#                     registry whose own Python has torch; faiss is whatever it has, and the JSON says so)
#   BENCH_GPU_TIMEOUT the outer hard stop in seconds (default 540; bench/gpu.py stops itself before)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [[ -n "${PYTHON_GPU:-}" ]]; then
  PY="$PYTHON_GPU"
else
  VENV="${GPU_VENV:-.venv-gpu}"
  STAMP="$VENV/.installed-gpu-$(sha256sum pyproject.toml | cut -c1-12)"
  if [[ ! -f "$STAMP" ]]; then
    echo "installing alignfuse[gpu] (faiss-gpu) into $VENV (once; not part of the benchmark's time)"
    test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q -e '.[gpu]'
    touch "$STAMP"
  fi
  PY="$VENV/bin/python"
fi

"$PY" -c 'import faiss; print(f"faiss {faiss.__version__}: {faiss.get_num_gpus()} GPU(s) visible to faiss")' ||
  echo "faiss is not importable by $PY: the faiss rows will be skipped (install the gpu extra)"
exec timeout --signal=KILL "${BENCH_GPU_TIMEOUT:-540}" "$PY" bench/gpu.py "$@"
