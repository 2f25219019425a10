#!/usr/bin/env bash
# make train-gpu: the shipped alignfuse:scenes-albef recipe (docs/training/README.md) on one GPU, in one command,
# under 10 minutes on a modern card: data, stages 1-3 (linear patch stem), the conv-stem warm start, stage 4
# (colour mates), and a comparison with the shipped weights on the validation splits.
#
#   make train-gpu                      # OUT=runs/gpu, DEVICE=cuda, PRECISION=bf16
#   TOY=1 DEVICE=cpu PRECISION=fp32 OUT=/tmp/t bash scripts/train-gpu.sh   # the test: tiny data, seconds per stage
#
# Each stage has a wall-clock budget (--max-minutes, cosine schedule over it): on a GPU the stages run as many
# steps as fit, so the result depends on the card; compare it with the shipped model before shipping it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
AF=("$PY" -m alignfuse.service.cli)
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
THREADS=${THREADS:-4}
TOY=${TOY:-0}
if [ "$TOY" = 1 ]; then
  N_TRAIN=64; N_VAL=24; MIN=(0.05 0.05 0.05 0.05); FIT=5; EVAL_IMAGES=16
else
  N_TRAIN=10000; N_VAL=500; MIN=(0.9 1.3 1.8 1.6); FIT=400; EVAL_IMAGES=200
fi
mkdir -p "$OUT/cfg"
start=$(date +%s)
log() { echo "[train-gpu $(( $(date +%s) - start ))s] $*"; }

if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with DEVICE=cpu (slow) or on a GPU machine")'
fi

# data (skipped when present)
gen() { [ -f "$OUT/data/$1/scenes.json" ] || OMP_NUM_THREADS=1 "${AF[@]}" scenes "$OUT/data/$1" --seed "$2" --count "$3" --split "$4"; }
gen train 1 "$N_TRAIN" train & gen val 2 "$N_VAL" val & gen compval 5 "$N_VAL" compositional & wait
log "data ready"

# configs: the shipped architecture, linear stem (stages 1-3) and conv stem (stage 4)
"$PY" - "$OUT/cfg" <<'PYCFG'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
cfg = json.loads(Path("models/weights/scenes-albef.json").read_text())
cfg["vocab"] = str(Path("models/weights/vocab.txt").resolve())
for stem in ("linear", "conv"):
    (out / f"albef-{stem}.json").write_text(json.dumps(dict(cfg, patch_stem=stem), indent=2))
PYCFG

COMMON=(--arch albef --data "$OUT/data/train/scenes.json" --val "$OUT/data/val/scenes.json"
  --vocab models/weights/vocab.txt --epochs 200 --batch-size 32 --weight-decay 0.02 --momentum 0.99
  --queue-size 2048 --itm-balance --mlm --concept-mask 0.5 --no-mlm-distill --perturb-negatives
  --time-schedule --save-every 200 --eval-images "$EVAL_IMAGES" --device "$DEVICE" --precision "$PRECISION"
  --threads "$THREADS" --name scenes-albef)
stage() {  # stage NAME MINUTES ARGS...
  local name=$1 minutes=$2; shift 2
  if [ -f "$OUT/$name/scenes-albef.safetensors" ]; then log "$name done before, kept"; return; fi
  "${AF[@]}" train "${COMMON[@]}" --max-minutes "$minutes" --out "$OUT/$name" "$@"
  log "$name finished"
}
stage stage1 "${MIN[0]}" --model-config "$OUT/cfg/albef-linear.json" --lr 1e-3 --warmup-steps 200 \
  --perturb-count 2 --group-mix 0.25 --group-mix-after 1 --seed 0
stage stage2 "${MIN[1]}" --model-config "$OUT/cfg/albef-linear.json" --init-from "$OUT/stage1/checkpoint.pth" \
  --lr 5e-4 --warmup-steps 50 --perturb-count 2 --perturb-easy 0.7 0.2 --group-mix 0.25 --group-mix-after 0 --seed 1
stage stage3 "${MIN[2]}" --model-config "$OUT/cfg/albef-linear.json" --init-from "$OUT/stage2/checkpoint.pth" \
  --lr 4e-4 --warmup-steps 50 --perturb-count 3 --perturb-easy 0.1 0.0 --group-mix 0.5 --group-mix-after 0 --seed 4
if [ ! -f "$OUT/warm-conv.pth" ]; then
  OMP_NUM_THREADS=$THREADS "$PY" docs/training/warm_start.py "$OUT/stage3/scenes-albef.safetensors" \
    "$OUT/cfg/albef-conv.json" "$OUT/warm-conv.pth" --mlm --fit-stem "$OUT/data/train/scenes.json" --fit-steps "$FIT"
fi
stage stage4 "${MIN[3]}" --model-config "$OUT/cfg/albef-conv.json" --init-from "$OUT/warm-conv.pth" \
  --lr 3e-4 --warmup-steps 100 --perturb-count 3 --perturb-easy 0.1 0.0 --attribute-captions 2 \
  --group-mix 0.25 --group-mix-after 0 --mate-mix 0.25 --mate-mix-after 0 --seed 7

log "trained: $OUT/stage4/scenes-albef.{safetensors,json} + vocab.txt (the released retrieval layout)"
# compare with the shipped weights on both validation splits (docs/training/choose_fusion.py: ALBEF's protocol,
# top-16 rerank, every fusion; the last line of each is the mean rerank R@1 per fusion)
for stem in models/weights/scenes-albef "$OUT/stage4/scenes-albef"; do
  echo "== $stem"
  OMP_NUM_THREADS=$THREADS "$PY" docs/training/choose_fusion.py "$stem" "$OUT/data/val/scenes.json" \
    "$OUT/data/compval/scenes.json" | tail -n 1
done
log "done: if the new weights score higher on the validation splits, copy $OUT/stage4/scenes-albef.* (and run"
log "choose_fusion.py --write on them) into models/weights/"
