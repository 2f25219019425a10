#!/usr/bin/env bash
# Build the local base image the deployment tests use instead of pulling python:3.11-slim-bookworm (no
# registry can be reached here): Debian bookworm minbase + python3 + python3-venv, bootstrapped from the
# Debian mirror apt is configured with and imported with `docker import`. Cached by tag: built once per machine.
#   usage: scripts/docker-base.sh [TAG]      (default alignfuse-base:bookworm-py311)
set -euo pipefail
TAG=${1:-alignfuse-base:bookworm-py311}
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "docker-base: $TAG is already there" >&2
  exit 0
fi
mirror=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources || true) | awk '{print $2}' | grep -v security | head -n 1)
if [ -z "$mirror" ]; then
  mirror=$( (grep -hs '^deb ' /etc/apt/sources.list || true) | awk '{print $2}' | grep -v security | head -n 1)
fi
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /tmp/alignfuse-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "docker-base: debootstrap bookworm from $mirror (about a minute)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
rm -f "$root.log"
echo "docker-base: built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
