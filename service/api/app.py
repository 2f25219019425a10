"""The FastAPI app factory and its lifespan (loads and warms the models in the background)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..engine import SearchEngine
from ..errors import install_error_handlers
from ..metrics import Metrics
from ..settings import Settings
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .routers import collections, ops, search, web
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
        try:
            yield
        finally:
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
    app.include_router(collections.router)
    app.include_router(ops.router)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.WEB_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _register_extra_schemas(app)
    return app


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
