"""Typed values the :class:`~alignfuse.service.engine.SearchEngine` takes and returns (no HTTP in here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from alignfuse.models.base import FUSIONS as FUSIONS
from alignfuse.models.base import Fusion as Fusion

Modality = Literal["image", "text"]


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
class SearchHit:
    """A result. Ranks are 1-based: ``rank_itc`` by ITC cosine among the candidates, ``rank`` final."""

    id: int
    kind: Modality
    uri: str
    caption: str | None
    metadata: Mapping[str, Any]
    itc: float
    itm_prob: float | None
    itm_logit: float | None
    score: float
    rank_itc: int
    rank: int
    rerank_failed: bool = False


@dataclass(frozen=True)
class Timings:
    """Milliseconds per stage."""

    encode: float
    ann: float
    rerank: float
    total: float


@dataclass(frozen=True)
class SearchResponse:
    collection: str
    version: int
    query: Modality
    target: Modality
    reranked: bool
    fusion: Fusion
    hits: list[SearchHit]
    timings: Timings
    pairs_scored: int
    candidates: int
    itc_hits: list[SearchHit] | None = None


@dataclass(frozen=True)
class ImageUpload:
    """An image to add: encoded bytes plus optional caption and user metadata."""

    data: bytes
    filename: str | None = None
    caption: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextUpload:
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AddResult:
    """Ids of the added items in request order (an existing id where the content was already live)."""

    collection: str
    version: int
    ids: list[int]
    added: int
    duplicates: int


@dataclass(frozen=True)
class DeleteResult:
    collection: str
    version: int
    id: int


@dataclass(frozen=True)
class CollectionInfo:
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
    """False when the collection was built with a dual encoder other than the one loaded."""
    error: str | None = None


@dataclass(frozen=True)
class ItemInfo:
    id: int
    kind: Modality
    uri: str
    caption: str | None
    metadata: Mapping[str, Any]
    state: str
    version_added: int


@dataclass(frozen=True)
class ModelsInfo:
    dual_encoder: str
    dual_encoder_id: str
    reranker: str | None
    reranker_id: str | None
    device: str
    precision: str
    default_fusion: str | None = None
