"""Write the service's OpenAPI schema to docs/openapi.json (tests/service/test_openapi.py keeps it in sync)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignfuse.service.api import create_app
from alignfuse.service.settings import Settings


def openapi_json() -> str:
    app = create_app(Settings(collections=Path("/nonexistent-collections-root")))
    return json.dumps(app.openapi(), indent=1, sort_keys=True) + "\n"


USAGE = "usage: python scripts/export_openapi.py [OUT.json]   (default: docs/openapi.json)\n"

if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1].startswith("-")):
        sys.stderr.write(USAGE)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    out = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
    )
    out.write_text(openapi_json())
    sys.stderr.write(f"wrote {out}\n")
