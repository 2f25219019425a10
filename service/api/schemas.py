"""Pydantic request/response schemas of the REST API (the OpenAPI contract).

Static bounds live here (so the OpenAPI document does not change with settings); the configured limits
(``max_k``, ``max_candidates``, ``max_text_chars``) are checked by the engine and answered with 422 and the
allowed range as well.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignfuse.models.base import Fusion as Fusion

Modality = Literal["image", "text"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SearchBody(_In):
    """A search. Exactly one of ``text`` or ``image`` (base64-encoded image bytes)."""

    collection: str = Field(min_length=1, max_length=128, examples=["scenes"])
    text: str | None = Field(None, description="Query text.", examples=["a red circle left of a blue square"])
    image: str | None = Field(
        None, description="Query image: base64 of the encoded file (JPEG, PNG, WebP...)."
    )
    target: Modality | None = Field(
        None, description="Modality to search; default: the other one (text→image, image→text)."
    )
    k: int = Field(10, ge=1, description="Hits to return (at most the server's max_k).")
    candidates: int | None = Field(
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
        None, ge=0.0, le=1.0, description="Drop hits whose ITM match probability is lower."
    )
    include_itc: bool = Field(False, description="Also return the top-k by ITC alone (before rerank).")


class HitOut(_Out):
    id: int
    kind: Modality
    uri: str
    caption: str | None
    metadata: dict[str, Any]
    itc: float = Field(description="Dual-encoder cosine similarity.")
    itm_prob: float | None = Field(description="Cross-encoder match probability (None when not reranked).")
    itm_logit: float | None = Field(description="Cross-encoder logit of the match class.")
    score: float = Field(description="The score the hits are sorted by.")
    rank_itc: int = Field(description="1-based rank by ITC among the candidates.")
    rank: int = Field(description="1-based rank after rerank.")
    rerank_failed: bool = Field(False, description="The candidate's image could not be read; ITC score used.")


class TimingsOut(_Out):
    encode: float
    ann: float
    rerank: float
    total: float


class SearchOut(_Out):
    collection: str
    version: int
    query: Modality
    target: Modality
    reranked: bool
    fusion: Fusion
    hits: list[HitOut]
    timings: TimingsOut = Field(description="Milliseconds per stage.")
    pairs_scored: int
    candidates: int
    itc_hits: list[HitOut] | None = None


class CollectionOut(_Out):
    name: str
    version: int
    images: int
    texts: int
    dim: int
    dual_encoder: str
    reranker: str | None
    index_key: str | None
    feature_cache: bool
    compatible: bool
    error: str | None = None


class ModelsOut(_Out):
    dual_encoder: str
    dual_encoder_id: str
    reranker: str | None
    reranker_id: str | None
    device: str
    precision: str
    default_fusion: str | None = Field(None, description="The fusion a search without `fusion` uses.")


class CollectionsOut(BaseModel):
    collections: list[CollectionOut]
    models: ModelsOut


class ItemOut(_Out):
    id: int
    kind: Modality
    uri: str
    caption: str | None
    metadata: dict[str, Any]
    state: str
    version_added: int


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


class AddOut(_Out):
    collection: str
    version: int
    ids: list[int]
    added: int
    duplicates: int


class DeleteOut(_Out):
    collection: str
    version: int
    id: int


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
        (401, "Missing or wrong API key"),
        (404, "Unknown collection or item"),
        (413, "Upload too large"),
        (415, "Unsupported media type"),
        (422, "Invalid input (with the allowed range)"),
        (429, "Overloaded: retry after Retry-After seconds"),
        (503, "Models loading or unavailable"),
        (504, "Request timed out"),
    )
}
