"""The API part of the hostile corpus (issue 12, suite test 2): every file of the generated corpus through the
upload and both search endpoints, and 100 kB captions and queries. A file the corpus marks good is accepted;
a bad one gets a 4xx whose body names the problem; nothing gets a 5xx; the server keeps serving."""

from __future__ import annotations

import base64
import mimetypes

import pytest
from fastapi.testclient import TestClient

from ..index.hostile import make_hostile_images
from .conftest import png_bytes

NAME_ONLY = {"name not valid UTF-8"}
BIG = "a red circle " * 7700  # ~100 kB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes, bool, str]]:
    base = tmp_path_factory.mktemp("hostile-api")
    entries = make_hostile_images(base / "images", base / "outside")
    out = []
    for e in entries:
        path = base / "images" / e.name
        if path.is_symlink() or not path.is_file():
            continue  # symlinks are a file-system matter (the CLI half); over HTTP there are only bytes
        # a name the file system cannot take is a file-system matter too: over HTTP a name is only metadata
        ok = e.ok or e.why in NAME_ONLY
        out.append((e.name, path.read_bytes(), ok, e.why))
    assert len(out) >= 20 and any(not ok for _, _, ok, _ in out)
    return out


def _ctype(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "image/png"


def _check(r: object, ok: bool, what: str) -> None:
    status = r.status_code  # type: ignore[attr-defined]
    assert status < 500, (what, status, r.text)  # type: ignore[attr-defined]
    if ok:
        assert status in (200, 201), (what, status, r.text)  # type: ignore[attr-defined]
    else:
        assert 400 <= status < 500, (what, status, r.text)  # type: ignore[attr-defined]
        err = r.json()["error"]  # type: ignore[attr-defined]
        assert err["code"] != "internal" and len(err["message"]) > 8, (what, err)
        assert "Traceback" not in r.text  # type: ignore[attr-defined]


def test_hostile_files_through_upload_and_search(
    client: TestClient, corpus: list[tuple[str, bytes, bool, str]]
) -> None:
    for name, data, ok, why in corpus:
        what = f"{why} ({name!r})"
        name = name.encode("utf-8", "replace").decode("utf-8")  # a client sends UTF-8 names
        files = [("files", (name, data, _ctype(name)))]
        _check(client.post("/v1/collections/plain/items", files=files, data={"captions": [why]}), ok, what)
        r = client.post(
            "/v1/search/image", files={"file": (name, data, _ctype(name))}, data={"collection": "plain"}
        )
        _check(r, ok, what)
        b64 = base64.b64encode(data).decode()
        _check(client.post("/v1/search", json={"collection": "plain", "image": b64, "k": 3}), ok, what)
    # unharmed: still ready, still searching, and every good file was added
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/search", json={"collection": "plain", "text": "a red circle", "k": 3})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3


def test_huge_captions_and_queries_are_refused_with_a_message(client: TestClient) -> None:
    r = client.post("/v1/search", json={"collection": "plain", "text": BIG})
    assert r.status_code == 422 and "1000" in r.json()["error"]["message"], r.text[:500]
    r = client.post("/v1/collections/plain/items", json={"texts": [{"text": BIG}]})
    assert r.status_code == 422 and "1000" in r.text, r.text[:500]
    files = [("files", ("a.png", png_bytes(), "image/png"))]
    r = client.post("/v1/collections/plain/items", files=files, data={"captions": [BIG]})
    assert r.status_code == 422 and "1000" in r.json()["error"]["message"], r.text[:500]
    r = client.post(
        "/v1/search/image", files={"file": ("a.png", png_bytes(), "image/png")}, data={"collection": BIG}
    )
    assert 400 <= r.status_code < 500, r.text[:500]
    assert client.post("/v1/search", json={"collection": "plain", "text": "ok"}).status_code == 200


def test_hostile_names_and_forms(client: TestClient) -> None:
    img = png_bytes()
    for name in ("../../etc/passwd.png", "/abs/x.png", "a\x00b.png", "ünï 图.png", "x" * 300 + ".png", ""):
        r = client.post("/v1/collections/plain/items", files=[("files", (name, img, "image/png"))])
        assert r.status_code in (201, 400, 422), (name, r.status_code, r.text[:300])
        if r.status_code == 201:
            item = client.get(f"/v1/collections/plain/items/{r.json()['ids'][0]}").json()
            assert item["uri"].startswith("uploads/") and ".." not in item["uri"]
            assert "/" not in item["metadata"].get("filename", "")
