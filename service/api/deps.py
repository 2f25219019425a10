"""FastAPI dependencies: settings, engine, metrics, API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from alignfuse.errors import UnauthorizedError, UnsupportedMediaError

from ..engine import SearchEngine
from ..metrics import Metrics
from ..settings import Settings


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with (override with ``app.dependency_overrides`` in tests)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> SearchEngine:
    engine: SearchEngine = request.app.state.engine
    return engine


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[SearchEngine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _check_key(request: Request, settings: Settings) -> None:
    key = settings.api_key
    if key is None or not key.get_secret_value():
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode("utf-8"), key.get_secret_value().encode("utf-8")):
        raise UnauthorizedError("wrong API key")


async def require_read(request: Request, settings: SettingsDep) -> None:
    """Reads need the key only when ``require_key_for_reads`` is on."""
    if settings.require_key_for_reads:
        _check_key(request, settings)


async def require_write(request: Request, settings: SettingsDep) -> None:
    """Writes need the key whenever one is configured."""
    _check_key(request, settings)


ReadAuth = Depends(require_read)
WriteAuth = Depends(require_write)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON."""
    ctype = _content_type(request)
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaError(
            f"content type {ctype or 'none'!r}: this endpoint takes application/json",
            detail={"accepted": ["application/json"]},
        )


async def require_multipart(request: Request) -> None:
    """415 unless the body is a multipart form (file upload)."""
    ctype = _content_type(request)
    if ctype != "multipart/form-data":
        raise UnsupportedMediaError(
            f"content type {ctype or 'none'!r}: this endpoint takes multipart/form-data",
            detail={"accepted": ["multipart/form-data"]},
        )


JsonBody = Depends(require_json)
MultipartBody = Depends(require_multipart)
