"""Typed values the :class:`~alignfuse.service.engine.SearchEngine` takes and returns (no HTTP in here).

Each field is declared once, here. What the engine *takes* (:class:`SearchRequest`, :class:`ImageUpload`,
:class:`TextUpload`) are frozen dataclasses: the engine checks them itself against the configured limits.
What it *returns* are frozen pydantic models that carry the field descriptions of the REST API; the API's
response schemas (:mod:`alignfuse.service.api.schemas`) subclass them only to give the OpenAPI components
their published names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignfuse.index.types import Modality as Modality
from alignfuse.models.base import FUSIONS as FUSIONS
from alignfuse.models.base import Fusion as Fusion


# -- what the engine takes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchRequest:
    """One query against one collection.

    Exactly one of ``text`` / ``image`` (encoded image bytes: JPEG, PNG, ...). ``target`` is the modality
    searched: by default the other one (text→image, image→text); text→text and image→image use the dual
    encoder only. ``candidates`` (C) defaults to the settings' ``default_candidates``. ``rerank``: None =
    rerank whenever a cross-encoder is loaded and the search is cross-modal; True requires it. ``fusion``:
    ``itm`` sorts by the ITM match logit, ``itm+itc`` by logit + cosine, ``itm+itc_logit`` by logit + cosine ×
    the dual encoder's logit scale (:func:`alignfuse.models.base.fuse_scores`); None: the reranker's own default
    (``ModelInfo.default_fusion``). ``min_match`` drops reranked hits
    whose ITM match probability is below it. ``include_itc`` also returns the top-k by ITC alone.

    The API's :class:`~alignfuse.service.api.schemas.SearchBody` has the same fields (``image`` as base64
    there); the router builds this from its ``model_dump()``.
    """

    collection: str
    text: str | None = None
    image: bytes | None = None
    target: Modality | None = None
    k: int = 10
    candidates: int | None = None
    rerank: bool | None = None
    fusion: Fusion | None = None
    min_match: float | None = None
    include_itc: bool = False


@dataclass(frozen=True)
class ImageUpload:
    """An image to add: encoded bytes plus optional caption and user metadata."""

    data: bytes
    filename: str | None = None
    caption: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextUpload:
    """A text to add (the API's ``TextIn`` has the same fields)."""

    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


# -- what the engine returns -----------------------------------------------------------------------------
class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class SearchHit(_Result):
    """A result. Ranks are 1-based: ``rank_itc`` by ITC cosine among the candidates, ``rank`` final."""

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


class Timings(_Result):
    """Milliseconds per stage."""

    encode: float
    ann: float
    rerank: float
    total: float


class SearchResponse(_Result):
    collection: str
    version: int
    query: Modality
    target: Modality
    reranked: bool
    fusion: Fusion
    hits: Sequence[SearchHit]
    timings: Timings = Field(description="Milliseconds per stage.")
    pairs_scored: int
    candidates: int
    itc_hits: Sequence[SearchHit] | None = None


class AddResult(_Result):
    """Ids of the added items in request order (an existing id where the content was already live)."""

    collection: str
    version: int
    ids: list[int]
    added: int
    duplicates: int


class DeleteResult(_Result):
    collection: str
    version: int
    id: int


class CollectionInfo(_Result):
    name: str
    version: int
    images: int
    texts: int
    dim: int
    dual_encoder: str
    reranker: str | None
    index_key: str | None
    feature_cache: bool
    compatible: bool  # False when the server does not hold the dual encoder that built the collection
    error: str | None = None


class Suggestion(_Result):
    """A query suggested for a collection (``alignfuse demo`` writes them), with what was measured of it:
    how many images of the collection it is true of (judged from what is drawn, not from captions) and
    how the rerank changed its top k."""

    text: str
    kind: str = Field(description="What the query asks: colour_shape, shape, count or relation.")
    n_true: int = Field(ge=1, description="Images of the collection of which the query is true.")
    k: int = Field(ge=1)
    precision_dual: float = Field(description="Share of the dual encoder's top k that make the query true.")
    precision_rerank: float = Field(description="Same, after the rerank.")
    first_true_dual: int | None = Field(description="Rank of the first true image by the dual encoder.")
    first_true_rerank: int | None = Field(description="Rank of the first true image after the rerank.")


class Suggestions(_Result):
    collection: str
    suggestions: Sequence[Suggestion]


class ItemInfo(_Result):
    id: int
    kind: Modality
    uri: str
    caption: str | None
    metadata: dict[str, Any]
    state: str
    version_added: int


class ModelsInfo(_Result):
    dual_encoder: str = Field(
        description="The default dual encoder (the configured one, else the most common)."
    )
    dual_encoder_id: str
    dual_encoders: list[str] = Field(
        default_factory=list,
        description="Every dual encoder this server holds: one per encoder its collections were built with "
        "(a query is encoded by the encoder of the collection it searches).",
    )
    reranker: str | None
    reranker_id: str | None
    device: str
    precision: str
    runtime: str = Field(
        "torch",
        description="What executes the models: torch or onnx (ONNX Runtime); 'dual:onnx, reranker:torch' "
        "when the dual encoder and the reranker differ.",
    )
    default_fusion: str | None = Field(None, description="The fusion a search without `fusion` uses.")
