"""The REST API against the real app: every endpoint, every error, auth, concurrency, overload."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from alignfuse.service.api import create_app
from alignfuse.service.engine import SearchEngine

from .conftest import World, async_client, make_engine, make_settings, png_bytes, wait_ready

ClientFactory = Callable[..., TestClient]


def _err(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in resp.text
    return body["error"]


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb); only the header is valid."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------ search
def test_search_text_json(client: TestClient) -> None:
    r = client.post(
        "/v1/search",
        json={"collection": "scenes", "text": "a red circle", "k": 4, "candidates": 12, "include_itc": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reranked"] is True and body["pairs_scored"] == 12 and len(body["hits"]) == 4
    assert set(body["timings"]) == {"encode", "ann", "rerank", "total"}
    hit = body["hits"][0]
    for key in (
        "id",
        "uri",
        "caption",
        "metadata",
        "itc",
        "itm_prob",
        "itm_logit",
        "rank_itc",
        "rank",
        "rerank_failed",
    ):
        assert key in hit
    assert len(body["itc_hits"]) == 4


def test_search_image_base64_and_multipart_agree(client: TestClient, world: World) -> None:
    img = world.image_bytes(2)
    a = client.post(
        "/v1/search",
        json={"collection": "plain", "image": base64.b64encode(img).decode(), "k": 3, "candidates": 8},
    )
    b = client.post(
        "/v1/search/image",
        files={"file": ("q.png", img, "image/png")},
        data={"collection": "plain", "k": "3", "candidates": "8"},
    )
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["target"] == "text"
    assert [h["id"] for h in a.json()["hits"]] == [h["id"] for h in b.json()["hits"]]
    data_url = "data:image/png;base64," + base64.b64encode(img).decode()
    c = client.post("/v1/search", json={"collection": "plain", "image": data_url, "target": "image", "k": 1})
    assert c.status_code == 200 and c.json()["hits"][0]["uri"].endswith("000002.png")


def test_search_errors(client: TestClient) -> None:
    post = lambda body: client.post("/v1/search", json=body)  # noqa: E731
    e = _err(post({"collection": "plain", "text": "x", "k": 0}), 422, "invalid_input")
    assert e["detail"][0]["allowed"] == {"ge": 1}
    e = _err(post({"collection": "plain", "text": "x", "k": 500}), 422, "invalid_input")
    assert e["detail"] == {"field": "k", "min": 1, "max": 100}
    e = _err(post({"collection": "plain", "text": "x", "candidates": 10_000}), 422)
    assert e["detail"]["max"] == 512
    _err(post({"collection": "plain", "text": ""}), 422)
    _err(post({"collection": "plain", "text": "y" * 5000}), 422)
    _err(post({"collection": "plain"}), 422)
    _err(post({"collection": "plain", "text": "x", "image": "aGk="}), 422)
    _err(post({"collection": "plain", "image": "not base64!!"}), 422)
    _err(post({"collection": "plain", "text": "x", "min_match": 3}), 422)
    _err(post({"collection": "plain", "text": "x", "fusion": "max"}), 422)
    _err(post({"collection": "plain", "text": "x", "bogus": 1}), 422)
    _err(post({"collection": "nope", "text": "x"}), 404, "not_found")
    _err(post({"collection": "../plain", "text": "x"}), 404, "not_found")
    _err(post({"collection": "foreign", "text": "x"}), 409, "encoder_mismatch")
    _err(
        post({"collection": "plain", "image": base64.b64encode(b"GIF89a-not-really").decode()}),
        415,
        "unsupported_media",
    )
    _err(
        post({"collection": "plain", "image": base64.b64encode(_bomb_png()).decode()}), 422, "image_too_large"
    )
    body = b'{"collection": "plain", "text": "x"}'
    _err(
        client.post("/v1/search", content=body, headers={"content-type": "text/plain"}),
        415,
        "unsupported_media",
    )
    _err(client.post("/v1/search", data={"collection": "plain", "text": "x"}), 415, "unsupported_media")
    _err(client.post("/v1/search/image", json={"collection": "plain"}), 415, "unsupported_media")
    r = client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"})
    _err(r, 422, "invalid_input")
    _err(client.get("/v1/nothing-here"), 404, "not_found")
    _err(client.put("/v1/search", json={}), 405)


def test_search_image_upload_errors(client_factory: ClientFactory, world: World) -> None:
    client = client_factory(limits={"max_upload_bytes": 8192, "max_pixels": 10_000})
    up = lambda name, data, ctype: client.post(  # noqa: E731
        "/v1/search/image", files={"file": (name, data, ctype)}, data={"collection": "plain"}
    )
    _err(up("a.txt", b"hello", "text/plain"), 415, "unsupported_media")
    _err(up("a.png", b"hello", "image/png"), 415, "unsupported_media")
    _err(up("a.png", png_bytes((200, 200)) + b"\0" * 10_000, "image/png"), 413, "payload_too_large")
    _err(up("a.png", png_bytes((150, 100)), "image/png"), 422, "image_too_large")  # 15k pixels > 10k
    _err(up("a.png", _bomb_png(), "image/png"), 422, "image_too_large")
    assert up("a.png", world.image_bytes(1), "image/png").status_code == 200
    r = client.post(
        "/v1/search/image",
        files={"file": ("a.png", world.image_bytes(1), "image/png")},
        data={"collection": "plain", "k": "0"},
    )
    _err(r, 422)
    _err(client.post("/v1/search/image", data={"collection": "plain"}), 415)  # a form without any file
    no_file = client.post(
        "/v1/search/image", files={"other": ("a.txt", b"x", "text/plain")}, data={"collection": "plain"}
    )
    _err(no_file, 422)


def test_request_body_limits(client_factory: ClientFactory) -> None:
    client = client_factory(limits={"max_request_bytes": 20_000})
    big = {"collection": "plain", "text": "x", "image": "A" * 30_000}
    _err(client.post("/v1/search", json=big), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while streaming
        for _ in range(10):
            yield b"A" * 4096

    r = client.post(
        "/v1/collections/plain/items", content=chunks(), headers={"content-type": "application/json"}
    )
    _err(r, 413, "payload_too_large")


# ------------------------------------------------------------------------------------------- collections
def test_collections_and_items_read(client: TestClient) -> None:
    r = client.get("/v1/collections")
    assert r.status_code == 200
    body = r.json()
    names = {c["name"]: c for c in body["collections"]}
    assert set(names) == {"foreign", "plain", "scenes"}
    assert names["scenes"]["feature_cache"] is True and names["foreign"]["compatible"] is False
    assert body["models"]["reranker"] == "albef:tiny"
    one = client.get("/v1/collections/plain").json()
    assert one["images"] == 24 and one["texts"] > 0 and one["version"] >= 1
    _err(client.get("/v1/collections/missing"), 404)
    items = client.get("/v1/collections/plain/items", params={"kind": "image", "limit": 5}).json()["items"]
    assert len(items) == 5 and all(i["kind"] == "image" for i in items)
    item = client.get(f"/v1/collections/plain/items/{items[0]['id']}").json()
    assert item["uri"] == items[0]["uri"]
    _err(client.get("/v1/collections/plain/items/999999"), 404)
    _err(client.get("/v1/collections/plain/items/abc"), 422)
    _err(client.get("/v1/collections/plain/items/99999999999999999999999"), 422)
    _err(client.delete("/v1/collections/plain/items/-1"), 422)
    _err(client.get("/v1/collections/plain/items", params={"offset": 10**30}), 422)


def test_thumbnail(client: TestClient) -> None:
    items = client.get("/v1/collections/plain/items", params={"limit": 200}).json()["items"]
    image = next(i for i in items if i["kind"] == "image")
    text = next(i for i in items if i["kind"] == "text")
    r = client.get(f"/v1/collections/plain/items/{image['id']}/thumbnail", params={"size": 32})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 32
    _err(client.get(f"/v1/collections/plain/items/{text['id']}/thumbnail"), 404)
    _err(client.get("/v1/collections/plain/items/999999/thumbnail"), 404)
    _err(client.get(f"/v1/collections/plain/items/{image['id']}/thumbnail", params={"size": 5000}), 422)
    # paths never come from the request
    _err(client.get("/v1/collections/..%2F..%2Fetc/items/1/thumbnail"), 404)
    _err(client.get("/v1/collections/plain/items/%2Fetc%2Fpasswd/thumbnail"), 404)


def test_add_images_texts_and_delete(client: TestClient) -> None:
    img = png_bytes((44, 44), (30, 30, 220))
    r = client.post(
        "/v1/collections/plain/items",
        files=[
            ("files", ("a.png", img, "image/png")),
            ("files", ("b.png", png_bytes((20, 20), (9, 9, 9)), "image/png")),
        ],
        data={"captions": ["a blue thing", "a dark thing"], "metadata": json.dumps({"batch": 7})},
    )
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["added"] == 2 and len(added["ids"]) == 2
    new_id = added["ids"][0]
    item = client.get(f"/v1/collections/plain/items/{new_id}").json()
    assert (
        item["caption"] == "a blue thing"
        and item["metadata"]["batch"] == 7
        and item["metadata"]["filename"] == "a.png"
    )
    assert client.get(f"/v1/collections/plain/items/{new_id}/thumbnail").status_code == 200
    s = client.post(
        "/v1/search",
        json={"collection": "plain", "image": base64.b64encode(img).decode(), "target": "image", "k": 1},
    )
    assert s.json()["hits"][0]["id"] == new_id and s.json()["version"] == added["version"]

    t = client.post(
        "/v1/collections/plain/items", json={"texts": [{"text": "hello there", "metadata": {"lang": "en"}}]}
    )
    assert t.status_code == 201 and t.json()["added"] == 1
    d = client.delete(f"/v1/collections/plain/items/{new_id}")
    assert d.status_code == 200 and d.json()["id"] == new_id
    _err(client.get(f"/v1/collections/plain/items/{new_id}"), 404)
    _err(client.delete(f"/v1/collections/plain/items/{new_id}"), 404)
    _err(client.delete("/v1/collections/plain/items/987654"), 404)

    # errors of the add endpoint
    _err(
        client.post("/v1/collections/plain/items", content=b"x", headers={"content-type": "text/plain"}), 415
    )
    _err(client.post("/v1/collections/plain/items", json={"texts": []}), 422)
    _err(client.post("/v1/collections/plain/items", json={"texts": [{"text": ""}]}), 422)
    _err(client.post("/v1/collections/plain/items", json={"texts": [{"text": "z" * 2000}]}), 422)
    _err(client.post("/v1/collections/plain/items", json={"nope": 1}), 422)
    _err(client.post("/v1/collections/plain/items", files=[("files", ("a.txt", b"hi", "text/plain"))]), 415)
    _err(client.post("/v1/collections/plain/items", files=[("files", ("a.png", b"hi", "image/png"))]), 415)
    _err(client.post("/v1/collections/plain/items", files=[("other", ("a.png", img, "image/png"))]), 422)
    _err(
        client.post(
            "/v1/collections/plain/items",
            files=[("files", ("a.png", img, "image/png"))],
            data={"metadata": "[1"},
        ),
        422,
    )
    _err(client.post("/v1/collections/missing/items", json={"texts": [{"text": "x"}]}), 404)
    _err(client.post("/v1/collections/foreign/items", json={"texts": [{"text": "x"}]}), 409)


def test_too_many_files(client_factory: ClientFactory) -> None:
    client = client_factory(limits={"max_files_per_upload": 2})
    files = [("files", (f"{i}.png", png_bytes((10 + i, 10)), "image/png")) for i in range(3)]
    _err(client.post("/v1/collections/plain/items", files=files), 422)


# ------------------------------------------------------------------------------------------- auth, ops
def test_auth_for_writes_and_optionally_reads(client_factory: ClientFactory) -> None:
    client = client_factory(api_key="sekret")
    assert client.get("/v1/collections").status_code == 200  # reads stay open
    assert client.post("/v1/search", json={"collection": "plain", "text": "x"}).status_code == 200
    body = {"texts": [{"text": "guarded"}]}
    e = client.post("/v1/collections/plain/items", json=body)
    _err(e, 401, "unauthorized")
    assert e.headers["www-authenticate"] == "Bearer"
    _err(
        client.post("/v1/collections/plain/items", json=body, headers={"Authorization": "Bearer wrong"}), 401
    )
    _err(
        client.post("/v1/collections/plain/items", json=body, headers={"Authorization": "Basic sekret"}), 401
    )
    ok = client.post("/v1/collections/plain/items", json=body, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 201
    _err(client.delete(f"/v1/collections/plain/items/{ok.json()['ids'][0]}"), 401)

    strict = client_factory(api_key="sekret", require_key_for_reads=True)
    for path in ("/v1/collections", "/v1/collections/plain", "/metrics"):
        _err(strict.get(path), 401)
        assert strict.get(path, headers={"Authorization": "Bearer sekret"}).status_code == 200
    _err(strict.post("/v1/search", json={"collection": "plain", "text": "x"}), 401)
    assert strict.get("/healthz").status_code == 200 and strict.get("/readyz").status_code == 200
    assert strict.get("/").status_code == 200


def test_ops_endpoints_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "models": None}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["models"]["dual_encoder"] == "alignfuse:random-tiny"
    assert ready["models"]["precision"] == "fp32"
    client.post("/v1/search", json={"collection": "plain", "text": "metrics please"})
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for name in (
        "alignfuse_http_requests_total",
        'alignfuse_search_stage_seconds_bucket{le="0.001",stage="rerank"}',
        "alignfuse_batch_size_bucket",
        "alignfuse_queue_depth",
        "alignfuse_rerank_image_states_total",
        "alignfuse_rejected_requests",
    ):
        assert name in text, name
    assert 'route="/v1/search"' in text
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/v1/search",
        "/v1/search/image",
        "/v1/collections",
        "/v1/collections/{name}",
        "/v1/collections/{name}/items",
        "/v1/collections/{name}/items/{item_id}",
        "/v1/collections/{name}/items/{item_id}/thumbnail",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths, p
    add = paths["/v1/collections/{name}/items"]["post"]["requestBody"]["content"]
    assert set(add) == {"application/json", "multipart/form-data"}
    assert paths["/v1/search"]["post"]["responses"]["429"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("/ErrorOut")
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "alignfuse" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_readyz_reports_the_active_precision_not_the_setting(
    client_factory: Callable[..., TestClient],
) -> None:
    """Models that run fp32 are reported fp32 even when the settings asked for bf16 (which a CPU without native
    bf16, or a model built elsewhere, does not run)."""
    ready = client_factory(models={"precision": "bf16"}).get("/readyz").json()
    assert ready["models"]["precision"] == "fp32" and ready["models"]["runtime"] == "torch"


def test_metrics_registry_is_per_app(client_factory: ClientFactory) -> None:
    a = client_factory()
    b = client_factory()
    for _ in range(3):
        a.get("/v1/collections")
    count = lambda c: c.app.state.metrics.registry.get_sample_value(  # noqa: E731
        "alignfuse_http_requests_total", {"route": "/v1/collections", "method": "GET", "status": "200"}
    )
    assert count(a) == 3 and count(b) is None


def test_models_loading_is_503_then_ready(world: World, root: Path) -> None:
    settings = make_settings(root)
    engine = make_engine(world, settings)
    gate = threading.Event()
    load = engine.load

    def slow_load() -> None:
        assert gate.wait(30)
        load()

    engine.load = slow_load  # type: ignore[method-assign]
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as client:
        r = client.get("/readyz")
        _err(r, 503, "not_ready")
        assert r.headers["retry-after"] == "1"
        _err(client.post("/v1/search", json={"collection": "plain", "text": "x"}), 503, "not_ready")
        _err(client.get("/v1/collections"), 503)
        assert client.get("/healthz").status_code == 200
        gate.set()
        wait_ready(client)
        assert client.post("/v1/search", json={"collection": "plain", "text": "x"}).status_code == 200


def test_failed_model_load_is_503(root: Path) -> None:
    settings = make_settings(root, models={"dual_encoder": "alignfuse:does-not-exist"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for _ in range(200):
            r = client.get("/readyz")
            if "failed" in r.json()["error"]["message"]:
                break
            threading.Event().wait(0.05)
        e = _err(r, 503, "not_ready")
        assert "does-not-exist" in e["message"]
        _err(client.post("/v1/search", json={"collection": "plain", "text": "x"}), 503)


def test_request_timeout_is_504(client_factory: ClientFactory) -> None:
    client = client_factory(limits={"request_timeout_s": 1e-6})
    _err(client.post("/v1/search", json={"collection": "plain", "text": "x"}), 504, "timeout")


# ---------------------------------------------------------------------------------- concurrency, overload
QUERIES = [
    "a red circle",
    "two blue squares",
    "a small green star left of a cross",
    "an orange diamond",
    "a purple triangle above a yellow circle",
    "three shapes",
    "a large pink cross",
    "a cyan star",
] * 2


def test_concurrent_requests_equal_sequential(world: World, root: Path) -> None:
    settings = make_settings(root, batching={"max_batch": 16, "max_wait_ms": 30.0})
    app = create_app(settings, engine=make_engine(world, settings))

    async def run() -> tuple[list[Any], list[Any]]:
        async with async_client(app) as c:

            async def one(i: int, q: str) -> Any:
                body: dict[str, Any] = {"collection": "plain", "k": 5, "candidates": 16}
                if i % 4 == 3:
                    body["image"] = base64.b64encode(world.image_bytes(i + 1)).decode()
                else:
                    body["text"] = q
                r = await c.post("/v1/search", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            seq = [await one(i, q) for i, q in enumerate(QUERIES)]
            par = await asyncio.gather(*[one(i, q) for i, q in enumerate(QUERIES)])
            return seq, list(par)

    seq, par = asyncio.run(run())
    for s, p in zip(seq, par, strict=True):
        assert [h["id"] for h in s["hits"]] == [h["id"] for h in p["hits"]]
        assert [h["rank_itc"] for h in s["hits"]] == [h["rank_itc"] for h in p["hits"]]
        for hs, hp in zip(s["hits"], p["hits"], strict=True):
            assert hp["itc"] == pytest.approx(hs["itc"], abs=1e-4)
            assert hp["itm_logit"] == pytest.approx(hs["itm_logit"], abs=1e-4)
    reg = app.state.metrics.registry
    n = reg.get_sample_value("alignfuse_batch_size_count", {"worker": "dual", "kind": "texts"})
    total = reg.get_sample_value("alignfuse_batch_size_sum", {"worker": "dual", "kind": "texts"})
    assert total == 2 * 12 + 1  # every text query encoded exactly once (+ warm-up)
    assert n < total  # and some of them shared a batch


def test_overload_is_429_never_5xx(world: World, root: Path) -> None:
    settings = make_settings(root, batching={"max_batch": 1, "queue_size": 1, "max_concurrent_requests": 3})
    engine: SearchEngine = make_engine(world, settings)
    app = create_app(settings, engine=engine)

    async def run() -> list[Any]:
        async with async_client(app) as c:
            reqs = [
                c.post("/v1/search", json={"collection": "plain", "text": q, "candidates": 24})
                for q in QUERIES * 2
            ]
            return list(await asyncio.gather(*reqs))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) > 0
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "overloaded"
    reg = app.state.metrics.registry
    assert (reg.get_sample_value("alignfuse_rejected_requests_total", {"reason": "concurrency"}) or 0) + (
        reg.get_sample_value("alignfuse_rejected_requests_total", {"reason": "queue_full"}) or 0
    ) == codes.count(429)


def test_openapi_does_not_depend_on_settings_and_default_candidates_are_capped(
    world: World, root: Path
) -> None:
    a = create_app(make_settings(root), engine=make_engine(world, make_settings(root)))
    tight = make_settings(root, limits={"max_k": 5, "max_candidates": 10}, api_key="x")
    b = create_app(tight, engine=make_engine(world, tight))
    assert a.openapi() == b.openapi()
    schema = a.openapi()["components"]["schemas"]
    expected = {
        "SearchBody",
        "SearchOut",
        "HitOut",
        "ErrorOut",
        "CollectionOut",
        "AddOut",
        "TextsBody",
        "TextIn",
    }
    assert expected <= set(schema)
    # every $ref of the document resolves
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(a.openapi())))
    assert refs <= set(schema), refs - set(schema)
    with TestClient(b, raise_server_exceptions=False) as client:
        wait_ready(client)
        r = client.post("/v1/search", json={"collection": "plain", "text": "x", "k": 5})
        assert r.status_code == 200 and r.json()["pairs_scored"] == 10  # default 128 capped at max_candidates
        _err(client.post("/v1/search", json={"collection": "plain", "text": "x", "k": 6}), 422)
