"""The OpenAPI schema is part of the API contract: changes to it must be deliberate (regenerate
docs/openapi.json with `python scripts/export_openapi.py` and review the diff)."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.export_openapi import openapi_json

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_openapi_matches_committed_schema() -> None:
    current = json.loads(openapi_json())
    committed = json.loads(DOC.read_text())
    assert current == committed, (
        "API schema changed: run `python scripts/export_openapi.py` and review the diff"
    )


def test_openapi_names_every_endpoint() -> None:
    paths = json.loads(openapi_json())["paths"]
    for path in (
        "/v1/search",
        "/v1/search/image",
        "/v1/collections",
        "/v1/collections/{name}",
        "/v1/collections/{name}/items",
        "/v1/collections/{name}/items/{item_id}",
        "/v1/collections/{name}/items/{item_id}/thumbnail",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
