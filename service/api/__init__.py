"""The REST API: ``create_app(settings) -> FastAPI``."""

from .app import create_app

__all__ = ["create_app"]
