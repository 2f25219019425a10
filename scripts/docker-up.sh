#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the deployment tests (idempotent).
#   - installs Debian's docker.io (+ iptables, debootstrap) when dockerd is missing (root + apt only);
#   - starts dockerd in the background when no daemon answers, and records that it did in $STATE;
#   - waits for `docker info`.
# scripts/docker-down.sh stops the daemon only if this script started it.
# Exit codes: 0 engine ready; 3 no engine can be had here (not root, no apt, start failed): callers skip.
set -euo pipefail

STATE=${ALIGNFUSE_DOCKER_STATE:-/tmp/alignfuse-dockerd}
mkdir -p "$STATE"

if docker info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "docker-up: no Docker engine and cannot install one (needs root and apt-get)" >&2
    exit 3
  fi
  echo "docker-up: installing docker.io, iptables and debootstrap (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends docker.io iptables debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "docker-up: no Docker daemon answers and only root can start one here" >&2
    exit 3
  fi
  echo "docker-up: starting dockerd (log: $STATE/dockerd.log)" >&2
  setsid dockerd >"$STATE/dockerd.log" 2>&1 < /dev/null &
  echo $! >"$STATE/dockerd.pid"
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
      exit 0
    fi
    sleep 0.5
  done
  echo "docker-up: dockerd did not answer within 30 s; its log:" >&2
  tail -n 20 "$STATE/dockerd.log" >&2 || true
  exit 3
fi
