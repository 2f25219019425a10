"""Pure ASGI middleware: request body limit (413), per-route request metrics, early admission (429)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import error_body
from ..metrics import Metrics


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 (by Content-Length up front, else while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> dict[str, Any]:
        return error_body(
            "payload_too_large",
            f"request body is over the limit of {self.max_bytes} bytes",
            {"max_bytes": self.max_bytes},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await _send_json(send, 413, self._too_large())
                    return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's own response to the cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_json(send, 413, self._too_large())


class MetricsMiddleware:
    """Count requests and observe latency by route template (not raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope.get("method", ""), str(status)).inc()
            self.metrics.request_latency.labels(path).observe(time.perf_counter() - start)


class AdmissionMiddleware:
    """Refuse a search with 429 before its body is read when the engine would refuse it anyway
    (:mod:`alignfuse.service.engine.admission`): under overload a rejection costs no parsing, no
    validation and no decoding. The engine still decides atomically for the searches that pass."""

    PATHS = frozenset({"/v1/search", "/v1/search/image"})

    def __init__(self, app: ASGIApp, engine: Any) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in self.PATHS:
            engine = self.engine
            decision = engine.admission.would_reject() if engine.ready else None
            if decision is not None:
                engine.metrics.rejected.labels(decision.reason).inc()
                message = (
                    f"overloaded: a new search would wait about {decision.expected_wait_s:.1f} s, over the "
                    f"admission deadline of {engine.admission.config.max_queue_wait_s:g} s"
                    if decision.reason == "capacity"
                    else f"too many concurrent searches ({engine.admission.in_flight})"
                )
                retry = str(max(1, math.ceil(decision.retry_after_s)))
                await _send_json(
                    send, 429, error_body("overloaded", message), ((b"retry-after", retry.encode()),)
                )
                return
        await self.app(scope, receive, send)
