#!/usr/bin/env bash
# Idempotent: install the peers that bench/peers.py compares against, each in its OWN venv (never the project's
# .venv), under $ALIGNFUSE_PEERS_DIR (default /work/peers, outside the repository):
#   <dir>/clip-retrieval   clip-retrieval 2.45.0  (`clip-retrieval inference`, `clip-retrieval back`)
#   <dir>/infinity         infinity-emb 0.0.78    (`infinity_emb v2 --engine torch --device cpu`)
# Each venv is ~6 GB and takes ~1.5 min. A venv is skipped when its stamp file exists (delete it to reinstall).
# Usage: scripts/peers-venv.sh [clip-retrieval] [infinity]     (default: both)
set -euo pipefail
PEERS_DIR="${ALIGNFUSE_PEERS_DIR:-/work/peers}"
PY="${PEERS_PYTHON:-python3}"
mkdir -p "$PEERS_DIR"

# Same torch pins as the project (ENVIRONMENT.md): an unpinned peer would silently pull another torch.
TORCH_PINS=('torch==2.14.1' 'torchvision==0.29.1')

install_peer() {
  local name="$1"; shift
  local venv="$PEERS_DIR/$name"
  local stamp="$venv/.alignfuse-peer-ok"
  if [ -f "$stamp" ]; then
    echo "peer $name: already installed at $venv ($(cat "$stamp"))"
    return 0
  fi
  echo "peer $name: installing into $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q "$@"
}


targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then targets=(clip-retrieval infinity); fi

for t in "${targets[@]}"; do
  case "$t" in
    clip-retrieval)
      venv="$PEERS_DIR/clip-retrieval"
      if [ ! -f "$venv/.alignfuse-peer-ok" ]; then
        install_peer clip-retrieval "${TORCH_PINS[@]}" 'clip-retrieval==2.45.0'
        # clip-anytorch imports pkg_resources, removed from setuptools 81.
        "$venv/bin/pip" install -q 'setuptools<81'
        "$venv/bin/clip-retrieval" --help >/dev/null
        "$venv/bin/pip" show clip-retrieval | sed -n 's/^Version: /clip-retrieval /p' >"$venv/.alignfuse-peer-ok"
      fi
      echo "peer clip-retrieval: $(cat "$venv/.alignfuse-peer-ok") at $venv"
      ;;
    infinity)
      venv="$PEERS_DIR/infinity"
      if [ ! -f "$venv/.alignfuse-peer-ok" ]; then
        # aiohttp is missing from infinity-emb's extras: image requests fail with a 500 without it.
        install_peer infinity "${TORCH_PINS[@]}" 'infinity-emb[server,torch,vision]==0.0.78' aiohttp
        "$venv/bin/infinity_emb" v2 --help >/dev/null
        "$venv/bin/pip" show infinity-emb | sed -n 's/^Version: /infinity-emb /p' >"$venv/.alignfuse-peer-ok"
      fi
      echo "peer infinity: $(cat "$venv/.alignfuse-peer-ok") at $venv"
      ;;
    *)
      echo "unknown peer: $t (known: clip-retrieval infinity)" >&2
      exit 2
      ;;
  esac
done
