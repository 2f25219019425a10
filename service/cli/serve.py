"""``alignfuse serve``: the REST API and web page under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._common import PRECISION_HELP


def serve(
    host: str | None = typer.Option(None, "--host", help="Bind address (default from settings: 127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", help="Port (default from settings: 8000; 0 = any free port)."
    ),
    collections: Path | None = typer.Option(
        None,
        "--collections",
        help="Folder holding the collections (default ALIGNFUSE_COLLECTIONS or ./collections).",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Dual-encoder spec (default: the one recorded in the collections' manifests)."
    ),
    reranker: str | None = typer.Option(
        None, "--reranker", help="Cross-encoder spec, or 'none' (default: the one recorded in the manifests)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto."),
    precision: str | None = typer.Option(None, "--precision", help=PRECISION_HELP),
    runtime: str | None = typer.Option(
        None,
        "--runtime",
        help="torch, onnx (ONNX Runtime, CPU) or auto (default: ONNX Runtime on a CPU for large models).",
    ),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Micro-batch size (1 = per-request)."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="ALIGNFUSE_API_KEY", help="Require 'Authorization: Bearer KEY' for writes."
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="uvicorn log level."),
) -> None:
    """Serve search over HTTP: REST API under /v1, web page at /, docs at /docs, metrics at /metrics."""
    import uvicorn

    from ..api import create_app
    from ..engine import SearchEngine
    from ..settings import Settings

    base = Settings()
    updates: dict[str, Any] = {}
    if collections is not None:
        updates["collections"] = collections
    models: dict[str, Any] = {}
    if model is not None:
        models["dual_encoder"] = model
    if reranker is not None:
        models["reranker"] = reranker
    if device is not None:
        models["device"] = device
    if precision is not None:
        models["precision"] = precision
    if runtime is not None:
        models["runtime"] = runtime
    if models:
        updates["models"] = base.models.model_copy(update=models)
    if max_batch is not None:
        updates["batching"] = base.batching.model_copy(update={"max_batch": max_batch})
    server: dict[str, Any] = {}
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if log_level is not None:
        server["log_level"] = log_level
    if server:
        updates["server"] = base.server.model_copy(update=server)
    if api_key is not None:
        updates["api_key"] = api_key
    # validate the merged values like the environment's
    settings = Settings.model_validate({**base.model_dump(), **{k: _dump(v) for k, v in updates.items()}})
    # fail fast with a clear message (exit code 2) when no model is given and no collection names one
    probe = SearchEngine(settings)
    try:
        dual_spec, rr_spec = probe.model_specs()
    finally:
        probe.close()
    app = create_app(settings)
    typer.echo(
        f"alignfuse serving {settings.collections} on http://{settings.server.host}:{settings.server.port} "
        f"with {dual_spec} + {rr_spec or 'no reranker'} (models load in the background; /readyz turns 200 "
        "when ready)",
        err=True,
    )
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        timeout_graceful_shutdown=10,
    )


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("serve")(serve)
