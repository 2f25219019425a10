#!/usr/bin/env bash
# Rerank benchmark on a CUDA GPU (bf16): every C for both sizes. Writes bench/results/rerank_gpu.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" bench/rerank.py --device cuda --precision "${PRECISION:-bf16}" --configs small,base \
  --candidates 16,32,64,128,256 --base-candidates 16,32,64,128,256 --repeats 5 \
  --out "${OUT:-bench/results/rerank_gpu.json}"
