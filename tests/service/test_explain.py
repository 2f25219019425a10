"""``POST /v1/explain`` (grounding heatmaps) on a real app, and a ViLT reranker in the engine (no feature
cache, per-pair full passes, explain answers 422)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from alignfuse.errors import InvalidInputError
from alignfuse.index import BuildOptions, KarpathySource, build_collection
from alignfuse.models.registry import create_cross_encoder
from alignfuse.service.api import create_app
from alignfuse.service.engine import SearchEngine
from alignfuse.service.images import resolve_uri

from ..models.test_vilt import save_tiny_vilt
from .conftest import World, make_settings, wait_ready

TEXT = "a red circle left of a blue square"


def _image_and_text_ids(client: TestClient) -> tuple[int, int]:
    items = client.get("/v1/collections/scenes/items", params={"limit": 200}).json()["items"]
    image = next(it["id"] for it in items if it["kind"] == "image")
    text = next(it["id"] for it in items if it["kind"] == "text")
    return image, text


def test_explain_heatmaps(client: TestClient, world: World) -> None:
    image_id, _ = _image_and_text_ids(client)
    r = client.post("/v1/explain", json={"collection": "scenes", "item_id": image_id, "text": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    cfg = world.cross.bundle.config  # type: ignore[attr-defined]
    side = cfg.image_res // cfg.patch_size
    assert body["grid"] == [side, side] and body["layer"] == 0 and body["reranker"] == "albef:tiny"
    assert [w["word"] for w in body["words"]] == TEXT.split()
    for w in body["words"]:
        heat = np.array(w["heatmap"])
        assert heat.shape == (side, side) and (heat >= 0).all()
        assert w["max"] == pytest.approx(float(heat.max()))
        assert 0 < w["peak"][0] < 1 and 0 < w["peak"][1] < 1
    assert any(w["max"] > 0 for w in body["words"])
    # the explained score is the score the reranker gives this pair
    engine = client.app.state.engine  # type: ignore[attr-defined]
    h, it = engine._live_item("scenes", image_id)
    pixels = world.cross.image_transform(Image.open(resolve_uri(it.uri, h.coll.path))).unsqueeze(0)
    s = world.cross.score(world.cross.text_states([TEXT]), world.cross.image_states(pixels))
    assert body["itm_logit"] == pytest.approx(float(s.logit[0]), abs=1e-4)
    assert body["match_prob"] == pytest.approx(float(s.prob[0]), abs=1e-5)


def test_explain_errors(client: TestClient) -> None:
    image_id, text_id = _image_and_text_ids(client)
    base = {"collection": "scenes", "item_id": image_id, "text": TEXT}
    r = client.post("/v1/explain", json={**base, "item_id": text_id})
    assert r.status_code == 404 and "explain needs an image item" in r.json()["error"]["message"]
    r = client.post("/v1/explain", json={**base, "item_id": 10**12})
    assert r.status_code == 404
    r = client.post("/v1/explain", json={**base, "collection": "nope"})
    assert r.status_code == 404
    r = client.post("/v1/explain", json={**base, "layer": 7})
    assert r.status_code == 404 and "fusion layer index 0..1" in r.json()["error"]["message"]
    r = client.post("/v1/explain", json={**base, "layer": 1.0})  # JSON Schema's integer 1.0 is layer 1
    assert r.status_code == 200, r.text
    r = client.post("/v1/explain", json={**base, "layer": True})  # a boolean is no layer
    assert r.status_code == 422
    r = client.post("/v1/explain", json={**base, "text": "   "})
    assert r.status_code == 422
    r = client.post("/v1/explain", json={**base, "surprise": 1})
    assert r.status_code == 422


def test_explain_in_openapi(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "/v1/explain" in doc["paths"]
    assert {"ExplainBody", "ExplainOut", "WordHeatmapOut"} <= set(doc["components"]["schemas"])


@pytest.fixture(scope="module")
def vilt(tmp_path_factory: pytest.TempPathFactory) -> object:
    return create_cross_encoder(f"vilt:{save_tiny_vilt(tmp_path_factory.mktemp('vilt'))}")


def test_vilt_reranks_without_feature_cache(world: World, root: Path, vilt: object) -> None:
    settings = make_settings(root, models={"reranker": None})
    engine = SearchEngine(settings, dual_encoder=world.dual, cross_encoder=vilt)  # type: ignore[arg-type]
    app = create_app(settings, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        h = engine._handle("scenes")
        assert h.coll.features is not None  # built with albef:tiny's feature cache ...
        assert engine._feature_cache(h) is None  # ... which a single-stream reranker never reads
        for _ in range(2):  # a second search finds nothing remembered either: full passes from the files
            r = client.post(
                "/v1/search", json={"collection": "scenes", "text": TEXT, "k": 3, "candidates": 6}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["reranked"] is True and body["pairs_scored"] == 6
            assert all(h["itm_logit"] is not None and not h["rerank_failed"] for h in body["hits"])
        assert engine._tokens._bytes == 0
        image_id, _ = _image_and_text_ids(client)
        r = client.post("/v1/explain", json={"collection": "scenes", "item_id": image_id, "text": TEXT})
        assert r.status_code == 422
        assert "not supported for ViLT" in r.json()["error"]["message"]


def test_builder_refuses_a_vilt_feature_cache(world: World, tmp_path: Path, vilt: object) -> None:
    js = world.data / "scenes.json"
    with pytest.raises(InvalidInputError, match="no image states to cache"):
        build_collection(
            tmp_path / "c",
            KarpathySource(js),
            world.dual,
            options=BuildOptions(progress=False, rerank_cache=True),
            cross_encoder=vilt,  # type: ignore[arg-type]
        )


def test_vilt_scores_from_engine_match_direct(world: World, vilt: object) -> None:
    """What the rerank kernel computes (fp16 canvases) is what the adapter scores from the file."""
    from alignfuse.service.engine.kernels import CrossKernels, RerankJob

    enc = vilt
    paths = sorted((world.data / "images").glob("*.png"))[:3]
    pixels = torch.stack([enc.image_transform(Image.open(p)) for p in paths])  # type: ignore[attr-defined]
    out = CrossKernels(enc, 8).rerank([RerankJob((TEXT,), None, pixels)])[0]  # type: ignore[arg-type]
    direct = enc.score(enc.text_states([TEXT]), enc.image_states(pixels))  # type: ignore[attr-defined]
    np.testing.assert_allclose(out.logit, direct.logit, atol=1e-3)
