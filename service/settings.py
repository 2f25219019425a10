"""Service settings (pydantic-settings). The only place in alignfuse that reads the environment.

Every field can be set through ``ALIGNFUSE_<FIELD>``; nested sections use ``__``, e.g.
``ALIGNFUSE_MODELS__RERANKER=alignfuse:scenes-albef`` or ``ALIGNFUSE_BATCHING__MAX_BATCH=1``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from alignfuse.models.base import PrecisionChoice, Runtime


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(_Section):
    """Which models serve the collections.

    ``dual_encoder``: a spec, or None to use the dual encoder recorded in the collections' manifests (the
    one most collections were built with). The engine also loads the dual encoder of every collection present
    at start (one per distinct encoder), so each collection is searched with its own; a collection whose encoder
    cannot be loaded is listed as incompatible and answers 409. ``reranker``: a spec, ``"none"`` to serve without a cross-encoder, or None to use the
    reranker recorded in the manifests of those collections (if any).
    """

    dual_encoder: str | None = None
    reranker: str | None = None
    device: str = "cpu"
    precision: PrecisionChoice = "fp32"
    """fp32; fp16/bf16 (GPU; bf16 also for ALBEF on a CPU with native bf16: Intel AMX / AVX512-BF16, as
    autocast); int8 (CPU: dynamically quantized weights); or ``auto``: bf16 on such a CPU for ALBEF models of at
    least 20 M parameters, fp32 everywhere else. bf16 and int8 stay opt-in: both are faster on CPUs but miss the
    parity bounds (docs/benchmarks.md). The active precision is reported by ``/readyz`` and the web page.
    ``ALIGNFUSE_MODELS__PRECISION``."""
    runtime: Runtime = "auto"
    """What executes the models: ``torch``, ``onnx`` (ONNX Runtime, CPU; ALBEF and open_clip) or ``auto``
    (ONNX Runtime on a CPU for models big enough that it is faster, see ``alignfuse.models.runtime``; torch
    on a GPU and for small models). ``ALIGNFUSE_MODELS__RUNTIME``."""
    graph_cache_dir: Path | None = None
    """Where exported ONNX graphs are cached when the weights' folder is not writable (default: the per-user
    cache, ``~/.cache/alignfuse/onnx``)."""
    warmup: bool = True
    rerank_memory_cache_mb: int = Field(default=256, ge=0)
    """Image states recomputed for rerank (collections without a feature cache) are kept in memory, fp16,
    up to this size (least recently used dropped first)."""


class BatchingSettings(_Section):
    """Micro-batching of query encoding and rerank pairs across concurrent requests.

    ``max_batch`` = 1 turns batching off (per-request execution). ``max_pairs`` bounds the rerank pairs of the
    requests gathered into one cross-encoder batch (a request with more pairs than that runs in a batch of its
    own) and the pairs of each ITM forward within a batch (such a request's pairs are scored in forwards of
    at most ``max_pairs``). It does not bound the text or vision tower passes, which run over every text and
    uncached image of the batch (the vision pass in chunks of 64 images).
    """

    max_batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=4.0, ge=0.0, le=1000.0)
    max_pairs: int = Field(default=1024, ge=1, le=65536)
    queue_size: int = Field(default=256, ge=1, le=100_000)
    max_concurrent_requests: int = Field(default=256, ge=1, le=100_000)
    max_queue_wait_ms: float = Field(default=1000.0, ge=0.0, le=600_000.0)
    """Admission by capacity: a search is rejected at once (429 + Retry-After) when its expected wait (the
    searches in flight × the measured device time per search) is over this; 0 turns the check off.
    ``max_concurrent_requests`` stays a hard cap (``ALIGNFUSE_BATCHING__MAX_QUEUE_WAIT_MS``)."""


class LimitSettings(_Section):
    """Input limits. Violations are client errors (4xx), never 500. ``default_candidates`` is capped by
    ``max_candidates``."""

    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_files_per_upload: int = Field(default=64, ge=1)
    max_texts_per_upload: int = Field(default=1024, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=64)
    max_text_chars: int = Field(default=1000, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_candidates: int = Field(default=512, ge=1)
    default_candidates: int = Field(default=128, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0.0)
    thumbnail_size: int = Field(default=256, ge=16, le=1024)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


class Settings(BaseSettings):
    """All service settings. Build with ``Settings()`` (reads ``ALIGNFUSE_*``) or explicitly in tests."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGNFUSE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    collections: Path = Path("collections")
    models: ModelSettings = ModelSettings()
    batching: BatchingSettings = BatchingSettings()
    limits: LimitSettings = LimitSettings()
    server: ServerSettings = ServerSettings()
    api_key: SecretStr | None = None
    require_key_for_reads: bool = False
    cors_origins: tuple[str, ...] = ()
    """Origins a browser may call the API from (CORS); empty (the default): CORS off, only the server's own
    web page. E.g. ``ALIGNFUSE_CORS_ORIGINS='["https://app.example.org"]'``; ``["*"]`` allows any origin
    (never with credentials)."""
    refresh_interval_s: float = Field(default=1.0, ge=0.0)
    """How often (at most) a search checks its collection for a newly committed version."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment (cached). The API uses the instance given to ``create_app`` instead."""
    return Settings()
