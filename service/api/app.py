"""The FastAPI app factory and its lifespan (loads and warms the models in the background)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from ..engine import SearchEngine
from ..errors import install_error_handlers
from ..metrics import Metrics
from ..settings import Settings
from .middleware import AdmissionMiddleware, BodyLimitMiddleware, MetricsMiddleware
from .routers import collections, explain, ops, search, web
from .schemas import TextsBody

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"


def create_app(settings: Settings | None = None, *, engine: SearchEngine | None = None) -> FastAPI:
    """Build the app. ``settings`` default to the environment (``ALIGNFUSE_*``); ``engine`` may be given
    (e.g. with injected models); otherwise one is made from the settings. The lifespan starts loading the
    models at startup without blocking: ``/readyz`` answers 503 until they are loaded and warm."""
    settings = settings if settings is not None else Settings()
    metrics = engine.metrics if engine is not None else Metrics()
    engine = engine if engine is not None else SearchEngine(settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await engine.start()
            except Exception:  # the error is kept on the engine and reported by /readyz
                log.error("model loading failed; the server answers 503 until restarted")

        app.state.load_task = asyncio.create_task(load())
        lag_task = asyncio.create_task(_watch_loop_lag(engine))
        try:
            yield
        finally:
            lag_task.cancel()
            if not app.state.load_task.done():
                await asyncio.wait({app.state.load_task}, timeout=30)
            engine.close()

    app = FastAPI(
        title="alignfuse",
        version=API_VERSION,
        summary="Two-stage image-text retrieval: dual encoder + FAISS, then a cross-encoder rerank.",
        lifespan=lifespan,
        openapi_tags=[
            {"name": "search", "description": "Text→image, image→text, text→text, image→image."},
            {"name": "collections", "description": "Collections and their items."},
            {"name": "operations", "description": "Health, readiness, metrics."},
        ],
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(search.router)
    app.include_router(explain.router)
    app.include_router(collections.router)
    app.include_router(ops.router)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.WEB_DIR), name="static")
    app.add_middleware(AdmissionMiddleware, engine=engine)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    warn_if_exposed(settings)
    _register_extra_schemas(app)
    return app


async def _watch_loop_lag(engine: SearchEngine, period_s: float = 0.05) -> None:
    """How late the event loop wakes up: the admission adds it to every new search's expected wait (a
    process starved of CPU or of the GIL sheds load before requests pile up in front of the loop)."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        engine.admission.observe_loop_lag(loop.time() - start - period_s)
        engine.metrics.loop_lag.set(engine.admission.loop_lag_s)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(settings: Settings) -> None:
    """Log a warning when the server listens beyond this machine with no API key (anyone who reaches it
    may add and delete items)."""
    key = settings.api_key
    if not is_loopback(settings.server.host) and (key is None or not key.get_secret_value()):
        log.warning(
            "listening on %s, reachable from other machines, without an API key: anyone who can reach "
            "it can add and delete items. Set ALIGNFUSE_API_KEY (see docs/operations.md)",
            settings.server.host,
        )


def _register_extra_schemas(app: FastAPI) -> None:
    """Add the schemas of bodies that routes parse themselves (one path takes JSON or multipart)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (TextsBody,):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, js)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
