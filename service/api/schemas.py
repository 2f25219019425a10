"""Pydantic request/response schemas of the REST API (the OpenAPI contract).

Static bounds live here (so the OpenAPI document does not change with settings); the configured limits
(``max_k``, ``max_candidates``, ``max_text_chars``) are checked by the engine and answered with 422 and the
allowed range as well.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from alignfuse.index.types import Modality as Modality
from alignfuse.models.base import Fusion as Fusion

from ..settings import LimitSettings
from ..types import (
    AddResult,
    CollectionInfo,
    DeleteResult,
    ItemInfo,
    ModelsInfo,
    SearchHit,
    SearchResponse,
    Suggestion,
    Suggestions,
    Timings,
)


class _In(BaseModel):
    # strict: ``"include_itc": 0`` or ``"k": "5"`` are type errors, as the OpenAPI document says
    model_config = ConfigDict(extra="forbid", strict=True)


def _default(field: str) -> Any:
    """The default of a limit: the published maximum (the server may be configured otherwise)."""
    return LimitSettings.model_fields[field].default


def _integral(value: Any) -> Any:
    """JSON Schema counts 9.0 as an integer; strict pydantic does not: take integral floats as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]
"""A strict int that takes the integral JSON numbers (``9.0``), never strings or booleans."""


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # an absent field, not a null one


DOC_MAX_K, DOC_MAX_C, DOC_MAX_CHARS = (
    _default("max_k"),
    _default("max_candidates"),
    _default("max_text_chars"),
)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    # NB a subclass without a docstring of its own: pydantic does not inherit ``__doc__``, so the engine
    # types' docstrings stay out of the OpenAPI document


# -- requests: the engine's request types are dataclasses checked against the configured limits; these add
# the static bounds and the wire format (``image`` as base64), and the routers build the engine's request
# from ``model_dump()`` (tests/service/test_openapi.py checks that the field names agree)
class SearchBody(_In):
    """A search. Exactly one of ``text`` or ``image`` (base64-encoded image bytes).

    The maxima published for ``k``, ``candidates`` and the text length are the server's default limits
    (``ALIGNFUSE_LIMITS__MAX_K`` ...); a server configured otherwise answers 422 with its own range."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["image"]}]})

    collection: str = Field(min_length=1, max_length=128, examples=["scenes"])
    # null is not a value of text or image: leave the field out instead (the schema says exactly one)
    text: Annotated[
        str | None,
        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": DOC_MAX_CHARS, "pattern": r"\S"}),
    ] = Field(
        None,
        json_schema_extra=_no_default,
        description="Query text (not only white space).",
        examples=["a red circle left of a blue square"],
    )
    image: Annotated[
        str | None,
        WithJsonSchema({"type": "string", "format": "byte", "contentEncoding": "base64", "minLength": 1}),
    ] = Field(
        None,
        json_schema_extra=_no_default,
        description="Query image: base64 of the encoded file (JPEG, PNG, WebP...).",
    )
    target: Modality | None = Field(
        None, description="Modality to search; default: the other one (text→image, image→text)."
    )
    k: Annotated[
        JsonInt, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": DOC_MAX_K, "default": 10})
    ] = Field(10, ge=1, description="Hits to return (at most the server's max_k).")
    candidates: Annotated[
        JsonInt | None,
        WithJsonSchema(
            {"anyOf": [{"type": "integer", "minimum": 1, "maximum": DOC_MAX_C}, {"type": "null"}]}
        ),
    ] = Field(
        None, ge=1, description="Dual-encoder candidates C to rerank (default 128, at most max_candidates)."
    )
    rerank: bool | None = Field(
        None,
        description="Rerank with the cross-encoder; default: whenever one is loaded and the search is cross-modal.",
    )
    fusion: Fusion | None = Field(
        None,
        description="Sort by ITM logit (itm), ITM logit + ITC cosine (itm+itc) or ITM logit + ITC cosine × the "
        "dual encoder's logit scale (itm+itc_logit); default: the reranker's own "
        "(`default_fusion` in GET /v1/collections).",
    )
    min_match: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Drop hits whose ITM match probability is lower (a finite number in [0, 1]).",
    )
    include_itc: bool = Field(False, description="Also return the top-k by ITC alone (before rerank).")

    @model_validator(mode="before")
    @classmethod
    def _no_null_query(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("text", "image"):
                if name in data and data[name] is None:
                    raise ValueError(f"{name} is null: leave it out, or give a string")
        return data

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchBody:
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text or image")
        return self


# -- responses: the engine's result types (fields and descriptions declared once, in ``service/types``),
# under the component names the OpenAPI document publishes; built with ``model_validate`` from the engine's
# results (``from_attributes``)
class HitOut(SearchHit, _Out):
    pass


class TimingsOut(Timings, _Out):
    pass


class SearchOut(SearchResponse, _Out):
    # the nested fields name the API's components (same fields, same order)
    hits: list[HitOut]
    timings: TimingsOut = Field(description="Milliseconds per stage.")
    itc_hits: list[HitOut] | None = None


class CollectionOut(CollectionInfo, _Out):
    pass


class ModelsOut(ModelsInfo, _Out):
    pass


class CollectionsOut(BaseModel):
    collections: list[CollectionOut]
    models: ModelsOut


class SuggestionOut(Suggestion, _Out):
    pass


class SuggestionsOut(Suggestions, _Out):
    suggestions: list[SuggestionOut]


class ItemOut(ItemInfo, _Out):
    pass


class ItemsOut(BaseModel):
    items: list[ItemOut]
    offset: int
    limit: int


class TextIn(_In):
    text: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class TextsBody(_In):
    """Texts to add (JSON). Images are added with a multipart upload to the same path."""

    texts: list[TextIn] = Field(min_length=1)


class AddOut(AddResult, _Out):
    pass


class DeleteOut(DeleteResult, _Out):
    pass


class ErrorInfo(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorOut(BaseModel):
    """The one error body of every endpoint."""

    error: ErrorInfo


class StatusOut(BaseModel):
    status: str
    models: ModelsOut | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": desc}
    for code, desc in (
        (400, "Malformed body (not parseable as the declared content type)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown collection or item"),
        (409, "Writer lock held, or the collection was built with another dual encoder"),
        (413, "Upload too large"),
        (415, "Unsupported media type"),
        (422, "Invalid input (with the allowed range)"),
        (429, "Overloaded: retry after Retry-After seconds"),
        (503, "Models loading or unavailable"),
        (504, "Request timed out"),
    )
}
