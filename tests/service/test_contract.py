"""The API's contract with its OpenAPI document and what responses may reveal (issue 12: H, I, M).

H: what schemathesis found (OPTIONS on items, strict booleans, exactly one of text/image in the schema, a
multipart part without Content-Type, non-finite numbers). I: no absolute server path in any response.
M: a start-up warning when listening beyond loopback without a key; CORS off unless configured.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alignfuse.service.api import create_app
from alignfuse.service.api.app import is_loopback
from alignfuse.service.engine.handles import public_uri

from .conftest import World, make_engine, make_settings, png_bytes

ClientFactory = Callable[..., TestClient]


def _err(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return dict(body["error"])


# -------------------------------------------------------------------------------------------------- H
def test_options_and_wrong_methods_name_every_allowed_method(client: TestClient) -> None:
    r = client.options("/v1/collections/plain/items")
    err = _err(r, 405)
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
    assert "POST" in err["message"] and "GET" in err["detail"]["allowed"]
    r = client.put("/v1/collections/plain/items/3")
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}
    r = client.get("/v1/search")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("include_itc", 0),
        ("include_itc", "true"),
        ("rerank", 1),
        ("k", "5"),
        ("k", 2.5),
        ("candidates", True),
    ],
)
def test_search_fields_are_strict(client: TestClient, field: str, value: Any) -> None:
    err = _err(
        client.post("/v1/search", json={"collection": "plain", "text": "a red circle", field: value}), 422
    )
    assert err["detail"][0]["loc"][-1] == field


def test_exactly_one_of_text_or_image_is_in_the_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchBody"]
    assert schema["oneOf"] == [{"required": ["text"]}, {"required": ["image"]}]
    assert schema["properties"]["text"]["type"] == "string"  # null is not a value: leave it out
    assert schema["properties"]["k"]["maximum"] == 100 and schema["properties"]["text"]["maxLength"] == 1000
    err = _err(client.post("/v1/search", json={"collection": "plain"}), 422)
    assert "exactly one of text or image" in json.dumps(err)
    img = base64.b64encode(png_bytes()).decode()
    _err(client.post("/v1/search", json={"collection": "plain", "text": "x", "image": img}), 422)
    err = _err(client.post("/v1/search", json={"collection": "plain", "text": None, "image": img}), 422)
    assert "text is null" in json.dumps(err)


def _multipart_without_type(payload: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "b0und"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'.encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_multipart_part_without_content_type_is_judged_by_its_bytes(client: TestClient) -> None:
    body, headers = _multipart_without_type(png_bytes((33, 21)))
    assert client.post("/v1/collections/plain/items", content=body, headers=headers).status_code == 201
    body, headers = _multipart_without_type(b"%PDF-1.4 not an image")
    err = _err(client.post("/v1/collections/plain/items", content=body, headers=headers), 415)
    assert "not an image" in err["message"] and "'none'" not in err["message"]
    # a declared non-image type is still refused by its type
    files = [("files", ("a.png", png_bytes(), "text/plain"))]
    assert "text/plain" in _err(client.post("/v1/collections/plain/items", files=files), 415)["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected_by_name(client: TestClient, value: str) -> None:
    raw = '{"collection": "plain", "text": "a red circle", "min_match": ' + value + "}"
    r = client.post("/v1/search", content=raw, headers={"content-type": "application/json"})
    err = _err(r, 422)
    assert err["detail"][0]["loc"][-1] == "min_match" and "finite" in err["detail"][0]["msg"]
    files = {"file": ("q.png", png_bytes(), "image/png")}
    r = client.post("/v1/search/image", files=files, data={"collection": "plain", "min_match": value.lower()})
    assert "finite" in json.dumps(_err(r, 422))


# -------------------------------------------------------------------------------------------------- I
def _no_server_path(payload: Any, *roots: Path) -> None:
    text = json.dumps(payload)
    for root in roots:
        assert str(root.resolve()) not in text, text[:2000]
    for hit in payload if isinstance(payload, list) else [payload]:
        for h in hit.get("hits", []) + (hit.get("itc_hits") or []) + hit.get("items", []):
            assert not h["uri"].startswith("/") and "://" not in h["uri"], h["uri"]


def test_responses_never_show_server_paths(client: TestClient, world: World, root: Path) -> None:
    # items built from files outside the collection: named by their file name
    items = client.get("/v1/collections/plain/items", params={"limit": 200}).json()
    _no_server_path(items, root, world.data)
    image = next(i for i in items["items"] if i["kind"] == "image")
    caption = next(i for i in items["items"] if i["kind"] == "text")
    assert image["uri"].endswith(".png") and "/" not in image["uri"]
    assert "#caption" in caption["uri"] and not caption["metadata"]["image_uri"].startswith("/")
    s = client.post("/v1/search", json={"collection": "plain", "text": "a red circle", "include_itc": True})
    _no_server_path(s.json(), root, world.data)
    # uploads: relative to the collection, and still shown by the thumbnail endpoint (the web page's way)
    up = client.post("/v1/collections/plain/items", files=[("files", ("mine.png", png_bytes(), "image/png"))])
    assert up.status_code == 201, up.text
    new_id = up.json()["ids"][0]
    item = client.get(f"/v1/collections/plain/items/{new_id}").json()
    assert item["uri"].startswith("uploads/") and item["metadata"]["filename"] == "mine.png"
    assert (root / "plain" / item["uri"]).is_file()
    _no_server_path(item, root, world.data)
    assert client.get(f"/v1/collections/plain/items/{new_id}/thumbnail").status_code == 200
    q = base64.b64encode(png_bytes()).decode()
    hit = client.post(
        "/v1/search", json={"collection": "plain", "image": q, "target": "image", "k": 1}
    ).json()
    assert hit["hits"][0]["id"] == new_id and hit["hits"][0]["uri"] == item["uri"]


def test_error_bodies_never_show_server_paths(client: TestClient, root: Path) -> None:
    # the collection "foreign" was built with another dual encoder: the index's message names its folder
    for r in (
        client.get("/v1/collections/foreign"),
        client.post("/v1/search", json={"collection": "foreign", "text": "a red circle"}),
    ):
        err = _err(r, 409)
        assert (
            str(root) not in json.dumps(err) and "'foreign'" in err["message"] or "foreign" in err["message"]
        )
        assert "/" not in err["message"].split("built with")[0], err


def test_scrub_paths() -> None:
    from alignfuse.service.errors import scrub_paths

    assert scrub_paths("collection /srv/c/x was built") == "collection x was built"
    assert scrub_paths({"file": "file:///srv/a/b.png", "n": 3}) == {"file": "b.png", "n": 3}
    for kept in ("content type image/png", "multipart/form-data", "http://example.org/a/b", "k in [1, 100]"):
        assert scrub_paths(kept) == kept


def test_public_uri_forms(tmp_path: Path) -> None:
    coll = tmp_path / "c"
    assert public_uri(str(coll / "uploads" / "ab" / "abc.png"), coll) == "uploads/ab/abc.png"
    assert public_uri("/srv/data/images/0001.png", coll) == "0001.png"
    assert public_uri("/srv/data/images/0001.png#caption3", coll) == "0001.png#caption3"
    assert public_uri("file:///srv/d/notes.txt#L4", coll) == "notes.txt#L4"
    assert public_uri("text:0123abcd", coll) == "text:0123abcd"
    assert public_uri("uploads/ab/abc.png", coll) == "uploads/ab/abc.png"
    assert public_uri("https://example.org/x.jpg", coll) == "https://example.org/x.jpg"


# -------------------------------------------------------------------------------------------------- M
@pytest.mark.parametrize(
    ("host", "key", "warns"),
    [("0.0.0.0", None, True), ("192.168.1.5", None, True), ("::", None, True), ("0.0.0.0", "k", False)]
    + [("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)],
)
def test_warns_when_exposed_without_a_key(
    world: World, root: Path, caplog: pytest.LogCaptureFixture, host: str, key: str | None, warns: bool
) -> None:
    settings = make_settings(root, server={"host": host}, api_key=key)
    with caplog.at_level(logging.WARNING, logger="alignfuse.service.api.app"):
        create_app(settings, engine=make_engine(world, settings))
    warned = [r for r in caplog.records if "without an API key" in r.getMessage()]
    assert bool(warned) == warns
    assert is_loopback(host) == (host in ("127.0.0.1", "::1", "localhost"))


def test_cors_off_by_default_and_configurable(client_factory: ClientFactory) -> None:
    pre = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    off = client_factory()
    r = off.get("/v1/collections", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in off.options("/v1/search", headers=pre).headers
    on = client_factory(cors_origins=["https://app.example"])
    ok = on.options("/v1/search", headers={**pre, "origin": "https://app.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    r = on.get("/v1/collections", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
