#!/usr/bin/env bash
# Idempotent: install the system tools the deployment tests use (docker-compose v1 validates compose files
# without a Docker engine). Needs root/apt; elsewhere it only says what is missing.
set -euo pipefail
if command -v docker-compose >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing docker-compose (Debian package) to validate docker/compose.yaml"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
else
  echo "docker-compose not found and cannot apt-get install it: compose validation tests will be skipped" >&2
fi
