"""The OpenAPI schema is part of the API contract: changes to it must be deliberate (regenerate
docs/openapi.json with `python scripts/export_openapi.py` and review the diff)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from alignfuse.service.api.schemas import (
    AddOut,
    CollectionOut,
    DeleteOut,
    HitOut,
    ItemOut,
    ModelsOut,
    SearchBody,
    SearchOut,
    TextIn,
    TimingsOut,
)
from alignfuse.service.types import (
    AddResult,
    CollectionInfo,
    DeleteResult,
    ItemInfo,
    ModelsInfo,
    SearchHit,
    SearchRequest,
    SearchResponse,
    TextUpload,
    Timings,
)
from scripts.export_openapi import openapi_json

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_openapi_matches_committed_schema() -> None:
    current, committed = openapi_json(), DOC.read_text()
    assert json.loads(current) == json.loads(committed), (
        "API schema changed: run `python scripts/export_openapi.py` and review the diff"
    )
    assert current == committed, "same schema, different bytes: regenerate docs/openapi.json"


def test_request_schemas_and_engine_requests_have_the_same_fields() -> None:
    """The routers build the engine's requests from ``model_dump()``: a field added on one side only fails
    here rather than at the first request."""
    assert list(SearchBody.model_fields) == [f.name for f in fields(SearchRequest)]
    assert list(TextIn.model_fields) == [f.name for f in fields(TextUpload)]


def test_response_schemas_are_the_engine_types() -> None:
    """Each response schema is its engine type under the published component name (fields declared once)."""
    for schema, engine_type in (
        (HitOut, SearchHit),
        (TimingsOut, Timings),
        (SearchOut, SearchResponse),
        (CollectionOut, CollectionInfo),
        (ModelsOut, ModelsInfo),
        (ItemOut, ItemInfo),
        (AddOut, AddResult),
        (DeleteOut, DeleteResult),
    ):
        assert issubclass(schema, engine_type), schema
        assert list(schema.model_fields) == list(engine_type.model_fields), schema


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
