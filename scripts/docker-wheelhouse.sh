#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image needs (torch + torchvision, the project's dependencies and
# the `EXTRA` extra, and the build backend), downloaded with this machine's pip configuration. With wheels
# there, docker/Dockerfile installs offline (`--no-index --find-links`). Skips the download when the
# requirement set is unchanged since the last run (a stamp holds its hash).
#   usage: scripts/docker-wheelhouse.sh [cpu|gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-cpu}
PY=${PYTHON:-.venv/bin/python}
OUT=docker/wheelhouse
req=$(mktemp)
trap 'rm -f "$req"' EXIT
"$PY" - "$EXTRA" >"$req" <<'PYEOF'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    doc = tomllib.load(f)
project = doc["project"]
lines = ["torch==2.14.1", "torchvision==0.29.1", *project["dependencies"]]
lines += project["optional-dependencies"][sys.argv[1]]
lines += doc["build-system"]["requires"]
print("\n".join(lines))
PYEOF
hash=$(sha256sum "$req" | cut -c1-16)
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$hash" ]; then
  echo "docker-wheelhouse: up to date ($(ls "$OUT"/*.whl | wc -l) wheels)" >&2
  exit 0
fi
echo "docker-wheelhouse: downloading the image's wheels into $OUT (a few GB; about a minute from local disk)" >&2
log=$(mktemp)
if ! "$PY" -m pip download -q --only-binary=:all: -d "$OUT" -r "$req" >"$log" 2>&1; then
  grep -v '^WARNING: Location' "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "$hash" >"$OUT/.stamp"
echo "docker-wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1)" >&2
