#!/usr/bin/env bash
# Stop the Docker daemon if (and only if) scripts/docker-up.sh started it.
set -euo pipefail
STATE=${ALIGNFUSE_DOCKER_STATE:-/tmp/alignfuse-dockerd}
[ -f "$STATE/dockerd.pid" ] || exit 0
pid=$(cat "$STATE/dockerd.pid")
if kill -0 "$pid" 2>/dev/null; then
  kill "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
fi
rm -f "$STATE/dockerd.pid"
