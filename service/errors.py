"""Domain errors → HTTP: the one table, and the one JSON error body.

Every error response of the API has the body ``{"error": {"code", "message", "detail"}}``. Domain errors
(``alignfuse.errors``) map to a status through ``_STATUS`` (the first matching class wins, so subclasses come
before their bases); request validation errors become 422 with the allowed ranges; anything unexpected is
logged and becomes a 500 without a stack trace.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from alignfuse.errors import (
    AlignfuseError,
    CheckpointError,
    ConflictError,
    CorruptDataError,
    EncoderMismatchError,
    ImageTooLargeError,
    InvalidInputError,
    ModelUnavailableError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnauthorizedError,
    UnsupportedMediaError,
)

log = logging.getLogger(__name__)

# THE table: domain error class → HTTP status. Order matters: subclasses before bases.
_STATUS: tuple[tuple[type[AlignfuseError], int], ...] = (
    (ImageTooLargeError, 422),
    (InvalidInputError, 422),
    (NotFoundError, 404),
    (EncoderMismatchError, 409),
    (ConflictError, 409),
    (CheckpointError, 503),
    (ModelUnavailableError, 503),
    (UnsupportedMediaError, 415),
    (PayloadTooLargeError, 413),
    (OverloadedError, 429),
    (RequestTimeoutError, 504),
    (NotReadyError, 503),
    (UnauthorizedError, 401),
    (CorruptDataError, 500),
)


def status_for(exc: AlignfuseError) -> int:
    """HTTP status of a domain error (500 for an AlignfuseError not in the table)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(code: str, message: str, detail: object | None = None) -> dict[str, Any]:
    """The one JSON error body."""
    return {"error": {"code": code, "message": message, "detail": detail}}


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def response_for(exc: AlignfuseError) -> JSONResponse:
    status = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, NotReadyError):
        headers["Retry-After"] = "1"
    elif isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if status == 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    elif isinstance(exc, NotReadyError):
        log.debug("%s: %s", type(exc).__name__, exc.message)
    elif status > 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return JSONResponse(
        error_body(exc.code, scrub_paths(exc.message), scrub_paths(_jsonable(exc.detail))),
        status_code=status,
        headers=headers,
    )


# an absolute path of the server's file system inside a message ("collection /srv/c/x was built ...")
_ABS_PATH = re.compile(r"(?:(?<![\w:/.~-])|file://)/(?:[^\s'\"/]+/)+([^\s'\"/]*)")


def scrub_paths(value: Any) -> Any:
    """Error bodies name files, never where they are on the server: every absolute path in a message (and in
    the strings of its detail) becomes its last part. The log keeps the full message."""
    if isinstance(value, str):
        return _ABS_PATH.sub(r"\1", value)
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    return value


# Constraint keys pydantic puts in an error's ctx that describe the allowed range / size.
_RANGE_KEYS = ("gt", "ge", "lt", "le", "min_length", "max_length", "expected", "pattern", "multiple_of")


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for err in exc.errors():
        item: dict[str, Any] = {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        ctx = err.get("ctx") or {}
        allowed = {k: _jsonable(ctx[k]) for k in _RANGE_KEYS if k in ctx}
        if allowed:
            item["allowed"] = allowed
        out.append(item)
    return out


async def _alignfuse_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AlignfuseError)
    return response_for(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = _validation_detail(exc)
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p not in ("body", "query", "path"))
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return JSONResponse(error_body("invalid_input", message, detail), status_code=422)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media",
    422: "invalid_input",
    429: "overloaded",
}


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    headers = dict(exc.headers or {})
    detail = None
    if exc.status_code == 405:
        # starlette names only the methods of the first route that matched the path; a path served by
        # several routes (GET and POST on .../items) allows the union
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
            message = f"method {request.method} is not allowed here; allowed: {', '.join(allowed)}"
            detail = {"allowed": allowed}
    return JSONResponse(error_body(code, message, detail), status_code=exc.status_code, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app serves at this path (probed: included routers are nested)."""
    routes = request.app.router.routes
    return [
        m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)
    ]


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal", "internal server error", None), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error of ``app`` into the one JSON body."""
    app.add_exception_handler(AlignfuseError, _alignfuse_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
