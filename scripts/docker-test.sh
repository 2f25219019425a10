#!/usr/bin/env bash
# The deployment, run for real (make docker-test): build the CPU image from docker/Dockerfile, bring the compose
# stack up under a fresh project name on a free loopback port, wait for health, search (text and image) through
# the API and check reranked results, restart the api container and check the collection survived (named
# volume), run one `tools` command, then `down -v`.
# Without a Docker engine (not root, no apt) it prints why and exits 0, unless CI is set: CI must run it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
COMPOSE=${COMPOSE:-docker-compose}
say() { printf '[docker-test %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

set +e
bash scripts/docker-up.sh
up=$?
set -e
if [ "$up" -ne 0 ]; then
  if [ -n "${CI:-}" ]; then
    say "FAILED: no Docker engine could be started (scripts/docker-up.sh exit $up)"
    exit 1
  fi
  say "SKIPPED: no Docker engine here (scripts/docker-up.sh exit $up); nothing was tested"
  exit 0
fi
command -v "$COMPOSE" >/dev/null || bash scripts/install-tools.sh

export ALIGNFUSE_BASE_IMAGE=${ALIGNFUSE_BASE_IMAGE:-alignfuse-base:bookworm-py311}
export ALIGNFUSE_IMAGE=${ALIGNFUSE_IMAGE:-alignfuse:cpu-test}
if [ "$ALIGNFUSE_BASE_IMAGE" = alignfuse-base:bookworm-py311 ]; then
  bash scripts/docker-base.sh "$ALIGNFUSE_BASE_IMAGE"
fi
PYTHON=$PY bash scripts/docker-wheelhouse.sh cpu

PROJECT=aftest$$
HOST_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export HOST_PORT
dc() { "$COMPOSE" -p "$PROJECT" -f docker/compose.yaml "$@"; }
cleanup() {
  set +e
  say "down -v"
  dc --profile tools down -v --remove-orphans >/dev/null 2>&1
}
trap cleanup EXIT

say "building $ALIGNFUSE_IMAGE from $ALIGNFUSE_BASE_IMAGE"
t0=$(date +%s)
dc build indexer
say "image built in $(($(date +%s) - t0)) s; size $(docker image inspect -f '{{.Size}}' "$ALIGNFUSE_IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

say "up -d (the indexer builds the demo collection, then the api starts) on 127.0.0.1:$HOST_PORT"
dc up -d api
wait_healthy() {
  local cid status
  cid=$(dc ps -q api)
  for _ in $(seq 1 120); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$cid" 2>/dev/null || echo missing)
    if [ "$status" = healthy ]; then
      say "api healthy"
      return 0
    fi
    sleep 2
  done
  say "api did not turn healthy (last status: $status)"
  dc logs --tail 40 api indexer
  return 1
}
wait_healthy
[ "$(docker inspect -f '{{.Config.User}}' "$(dc ps -q api)")" = 10001 ] || { say "api runs as root"; exit 1; }
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(dc ps -q indexer)")" = 0 ] || { say "indexer failed"; exit 1; }

search() {
  "$PY" - "$HOST_PORT" <<'PYEOF'
import base64, io, json, sys, urllib.request

from PIL import Image, ImageDraw

base = f"http://127.0.0.1:{sys.argv[1]}"

def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)

cols = json.load(urllib.request.urlopen(base + "/v1/collections", timeout=10))
names = [c["name"] for c in (cols["collections"] if isinstance(cols, dict) else cols)]
assert "scenes" in names, names
res = post("/v1/search", {"collection": "scenes", "text": "a red circle", "k": 5})
assert res["reranked"] and res["hits"], res
print("text search 'a red circle' (reranked):")
for h in res["hits"]:
    print(f"  #{h['rank']} (itc #{h['rank_itc']}) item {h['id']} itm_p={h['itm_prob']:.3f} {h.get('caption') or ''}")
img = Image.new("RGB", (96, 96), (235, 235, 235))
ImageDraw.Draw(img).ellipse((30, 30, 66, 66), fill=(220, 30, 30))
buf = io.BytesIO()
img.save(buf, format="PNG")
res = post("/v1/search", {"collection": "scenes", "image": base64.b64encode(buf.getvalue()).decode(), "k": 3})
assert res["reranked"] and res["hits"] and res["target"] == "text", res
print("image search (a drawn red circle) -> texts (reranked):")
for h in res["hits"]:
    print(f"  #{h['rank']} (itc #{h['rank_itc']}) itm_p={h['itm_prob']:.3f} {h.get('caption') or ''}")
PYEOF
}
search

say "restart api: the collection lives in the named volume"
dc restart api
wait_healthy
search

say "tools profile: alignfuse info on the same volume"
dc --profile tools run --rm tools info /data/collections/scenes | tee /tmp/alignfuse-docker-info.txt
grep -q "scenes" /tmp/alignfuse-docker-info.txt
say "PASSED in $(($(date +%s) - t0)) s"
