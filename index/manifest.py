"""The manifest: what a committed collection version consists of, as typed frozen dataclasses.

``manifest.json`` (current) and ``versions/<n>.json`` (every committed version) hold the same JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from alignfuse.errors import CorruptDataError, EncoderMismatchError
from alignfuse.models.base import ModelInfo, Preprocess

from .types import KINDS, Kind

SCHEMA_VERSION = 1
METRIC = "inner_product"


@dataclass(frozen=True)
class EncoderRecord:
    """The dual encoder (or reranker) that a collection was built with."""

    spec: str
    weights_sha256: str
    embed_dim: int
    family: str = ""
    arch: str = ""
    weights: str = ""
    preprocess: Preprocess | None = None

    @classmethod
    def from_info(cls, info: ModelInfo) -> EncoderRecord:
        return cls(
            spec=info.spec,
            weights_sha256=info.weights_sha256,
            embed_dim=int(info.embed_dim),
            family=info.family,
            arch=info.arch,
            weights=info.weights,
            preprocess=info.preprocess,
        )

    @property
    def id(self) -> str:
        return f"{self.spec}#{self.weights_sha256[:12]}"

    def matches(self, info: ModelInfo) -> bool:
        return info.spec == self.spec and info.weights_sha256 == self.weights_sha256

    def check(self, info: ModelInfo, *, what: str, collection: str) -> None:
        """Raise EncoderMismatchError naming both models unless ``info`` is this model."""
        if not self.matches(info):
            raise EncoderMismatchError(
                f"collection {collection} was built with {what} {self.spec!r} "
                f"(weights sha256 {self.weights_sha256[:12]}) but {info.spec!r} "
                f"(weights sha256 {info.weights_sha256[:12]}) was given",
                detail={"expected": self.id, "given": info.id},
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.preprocess is not None:
            d["preprocess"] = asdict(self.preprocess)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncoderRecord:
        pre = d.get("preprocess")
        preprocess = None
        if pre is not None:
            preprocess = Preprocess(
                image_size=int(pre["image_size"]),
                mean=tuple(pre["mean"]),  # type: ignore[arg-type]
                std=tuple(pre["std"]),  # type: ignore[arg-type]
                interpolation=pre.get("interpolation", "bicubic"),
                resize_mode=pre.get("resize_mode", "shortest"),
                center_crop=bool(pre.get("center_crop", True)),
            )
        return cls(
            spec=d["spec"],
            weights_sha256=d["weights_sha256"],
            embed_dim=int(d["embed_dim"]),
            family=d.get("family", ""),
            arch=d.get("arch", ""),
            weights=d.get("weights", ""),
            preprocess=preprocess,
        )


@dataclass(frozen=True)
class ModalityPart:
    """One modality inside a segment: how many vectors and which FAISS key its index was built with."""

    count: int
    index_key: str


@dataclass(frozen=True)
class SegmentRecord:
    """An immutable segment directory ``segments/<id>/``."""

    id: str
    version: int  # the version that created it
    parts: tuple[tuple[Kind, ModalityPart], ...] = ()

    def part(self, kind: Kind) -> ModalityPart | None:
        for k, p in self.parts:
            if k == kind:
                return p
        return None

    def count(self, kind: str | None = None) -> int:
        return sum(p.count for k, p in self.parts if kind is None or k == kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "parts": {k: {"count": p.count, "index_key": p.index_key} for k, p in self.parts},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SegmentRecord:
        parts = tuple(
            (k, ModalityPart(int(v["count"]), str(v["index_key"])))
            for k, v in d.get("parts", {}).items()
            if k in KINDS
        )
        return cls(id=d["id"], version=int(d["version"]), parts=parts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FeatureChunk:
    """One file pair ``features/<id>.npy`` (fp16 tokens [n, L, D]) + ``features/<id>.ids.npy``."""

    id: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "count": self.count}


@dataclass(frozen=True)
class FeaturesRecord:
    """The rerank feature cache of a version."""

    reranker: EncoderRecord
    token_shape: tuple[int, int]  # (L, D)
    chunks: tuple[FeatureChunk, ...] = ()

    @property
    def count(self) -> int:
        return sum(c.count for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "reranker": self.reranker.to_json(),
            "token_shape": list(self.token_shape),
            "chunks": [c.to_json() for c in self.chunks],
            "count": self.count,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeaturesRecord:
        return cls(
            reranker=EncoderRecord.from_json(d["reranker"]),
            token_shape=(int(d["token_shape"][0]), int(d["token_shape"][1])),
            chunks=tuple(FeatureChunk(c["id"], int(c["count"])) for c in d.get("chunks", [])),
        )


@dataclass(frozen=True)
class Manifest:
    """One committed version of a collection."""

    version: int
    encoder: EncoderRecord
    index_key: str | None  # requested FAISS key; None = automatic (choose_index_key)
    segments: tuple[SegmentRecord, ...] = ()
    tombstones: str | None = None  # relative path of a sorted int64 .npy, or None
    tombstone_count: int = 0
    counts: tuple[tuple[str, int], ...] = ()  # live items per kind + "deleted"
    next_id: int = 1
    reranker: EncoderRecord | None = None
    features: FeaturesRecord | None = None
    metric: str = METRIC
    schema_version: int = SCHEMA_VERSION
    created_at: float = 0.0
    committed_at: float = 0.0
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def dim(self) -> int:
        return self.encoder.embed_dim

    def count(self, kind: str) -> int:
        return dict(self.counts).get(kind, 0)

    def with_(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "version": self.version,
            "created_at": self.created_at,
            "committed_at": self.committed_at,
            "encoder": self.encoder.to_json(),
            "reranker": None if self.reranker is None else self.reranker.to_json(),
            "index": {"key": self.index_key or "auto", "metric": self.metric, "normalized": True},
            "segments": [s.to_json() for s in self.segments],
            "tombstones": {"path": self.tombstones, "count": self.tombstone_count},
            "counts": dict(self.counts),
            "next_id": self.next_id,
            "features": None if self.features is None else self.features.to_json(),
            "extra": dict(self.extra),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        schema = int(d.get("schema_version", 0))
        if schema != SCHEMA_VERSION:
            raise CorruptDataError(
                f"unsupported collection schema version {schema} (expected {SCHEMA_VERSION})"
            )
        idx = d.get("index", {})
        key = idx.get("key")
        tomb = d.get("tombstones") or {}
        return cls(
            version=int(d["version"]),
            encoder=EncoderRecord.from_json(d["encoder"]),
            index_key=None if key in (None, "auto") else str(key),
            segments=tuple(SegmentRecord.from_json(s) for s in d.get("segments", [])),
            tombstones=tomb.get("path"),
            tombstone_count=int(tomb.get("count", 0)),
            counts=tuple((str(k), int(v)) for k, v in d.get("counts", {}).items()),
            next_id=int(d.get("next_id", 1)),
            reranker=None if d.get("reranker") is None else EncoderRecord.from_json(d["reranker"]),
            features=None if d.get("features") is None else FeaturesRecord.from_json(d["features"]),
            metric=str(idx.get("metric", METRIC)),
            schema_version=schema,
            created_at=float(d.get("created_at", 0.0)),
            committed_at=float(d.get("committed_at", 0.0)),
            extra=tuple((str(k), str(v)) for k, v in d.get("extra", {}).items()),
        )

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        try:
            return cls.from_json(json.loads(text))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptDataError(f"cannot read manifest {path}: {exc}") from exc
