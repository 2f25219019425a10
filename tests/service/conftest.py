"""Fixtures of the service tests: small real collections (synthetic scenes, built with ``index``'s
builder) and small real random-init models (``alignfuse:random-tiny`` dual encoder, ``albef:tiny``
cross-encoder), loaded once per session."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from alignfuse.data.scenes import generate_scenes
from alignfuse.index import BuildOptions, KarpathySource, build_collection
from alignfuse.models.base import CrossEncoder, DualEncoder
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder
from alignfuse.service.api import create_app
from alignfuse.service.engine import SearchEngine
from alignfuse.service.settings import Settings

DUAL_SPEC = "alignfuse:random-tiny"
CROSS_SPEC = "albef:tiny"
N_SCENES = 24


@dataclass(frozen=True)
class World:
    """Read-only session data: the scenes folder, a pristine collections root and the models."""

    data: Path
    root: Path
    dual: DualEncoder
    cross: CrossEncoder
    other_dual: DualEncoder

    def image_bytes(self, i: int = 1) -> bytes:
        return (self.data / "images" / f"{i:06d}.png").read_bytes()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("service-world")
    js = generate_scenes(base / "data", seed=7, count=N_SCENES, size=48)
    dual = create_dual_encoder(DUAL_SPEC)
    cross = create_cross_encoder(CROSS_SPEC)
    other = create_dual_encoder(CROSS_SPEC)  # ALBEF's own ITC dual encoder: a different model
    root = base / "collections"
    opts = BuildOptions(progress=False, batch_size=32)
    # "scenes": with the rerank feature cache; "plain": without (image states recomputed from files)
    build_collection(
        root / "scenes",
        KarpathySource(js),
        dual,
        options=BuildOptions(progress=False, batch_size=32, rerank_cache=True),
        cross_encoder=cross,
    )
    build_collection(root / "plain", KarpathySource(js), dual, options=opts)
    # built with another dual encoder: listed as incompatible, searching it is a 409
    build_collection(root / "foreign", KarpathySource(js), other, options=opts)
    return World(data=base / "data", root=root, dual=dual, cross=cross, other_dual=other)


@pytest.fixture()
def root(world: World, tmp_path: Path) -> Path:
    """A private copy of the collections (tests may write to it)."""
    dest = tmp_path / "collections"
    shutil.copytree(world.root, dest)
    return dest


def make_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "collections": root,
        "models": {"dual_encoder": DUAL_SPEC, "reranker": CROSS_SPEC, "warmup": True},
        "refresh_interval_s": 0.0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return Settings.model_validate(values)


def make_engine(world: World, settings: Settings) -> SearchEngine:
    return SearchEngine(settings, dual_encoder=world.dual, cross_encoder=world.cross)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("app did not become ready")


@pytest.fixture()
def client_factory(world: World, root: Path) -> Iterator[Callable[..., TestClient]]:
    """``client_factory(**settings_overrides)`` → a ready TestClient on a real app (lifespan run)."""
    stack: list[TestClient] = []

    def factory(**overrides: Any) -> TestClient:
        settings = make_settings(root, **overrides)
        app = create_app(settings, engine=make_engine(world, settings))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        stack.append(client)
        wait_ready(client)
        return client

    yield factory
    for c in reversed(stack):
        c.__exit__(None, None, None)


@pytest.fixture()
def client(client_factory: Callable[..., TestClient]) -> TestClient:
    return client_factory()


@asynccontextmanager
async def async_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx AsyncClient over the ASGI app with its lifespan running (models ready)."""
    async with app.router.lifespan_context(app):
        await asyncio.wait({app.state.load_task})
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def png_bytes(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, colour)
    for x in range(size[0] // 4):
        img.putpixel((x, x % size[1]), (0, 0, 255))
    img.save(buf, format="PNG")
    return buf.getvalue()
