"""SearchEngine without HTTP: the four directions, rerank, fusion, min_match, feature cache vs recompute,
unreadable candidates, adds/deletes committed atomically, and refresh of versions committed elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from alignfuse.errors import EncoderMismatchError, InvalidInputError, NotFoundError, NotReadyError
from alignfuse.index import Collection, NewItem
from alignfuse.service.engine import SearchEngine
from alignfuse.service.types import ImageUpload, SearchRequest, TextUpload

from .conftest import World, make_engine, make_settings, png_bytes


@pytest.fixture()
def engine(world: World, root: Path) -> Iterator[SearchEngine]:
    e = make_engine(world, make_settings(root))
    e.load()
    yield e
    e.close()


def test_text_to_image_reranks_all_candidates(engine: SearchEngine) -> None:
    r = engine.search_sync(
        SearchRequest(collection="plain", text="a red circle", k=5, candidates=16, include_itc=True)
    )
    assert (r.query, r.target, r.reranked) == ("text", "image", True)
    assert r.candidates == 16 and r.pairs_scored == 16
    assert len(r.hits) == 5
    assert all(h.kind == "image" and h.itm_prob is not None and 0 < h.itm_prob < 1 for h in r.hits)
    # sorted by the ITM logit (ALBEF's score); ranks consistent
    logits = [h.itm_logit for h in r.hits]
    assert logits == sorted(logits, reverse=True)
    assert [h.rank for h in r.hits] == [1, 2, 3, 4, 5]
    assert [h.score for h in r.hits] == logits
    # itc_hits: the dual encoder's own top-k, in ITC order
    assert r.itc_hits is not None and [h.rank_itc for h in r.itc_hits] == [1, 2, 3, 4, 5]
    itc = [h.itc for h in r.itc_hits]
    assert itc == sorted(itc, reverse=True)
    # every stage was measured (a stage left at zero or counted twice fails here)
    t = r.timings
    assert t.encode > 0 and t.ann > 0 and t.rerank > 0
    assert t.encode + t.ann + t.rerank <= t.total + 1e-6


def test_fusion_itm_plus_itc_and_min_match(engine: SearchEngine) -> None:
    base = SearchRequest(collection="plain", text="two blue squares", k=16, candidates=16)
    r = engine.search_sync(SearchRequest(**{**base.__dict__, "fusion": "itm+itc"}))
    for h in r.hits:
        assert h.score == pytest.approx(h.itm_logit + h.itc, abs=1e-5)
    assert [h.score for h in r.hits] == sorted((h.score for h in r.hits), reverse=True)
    probs = sorted(h.itm_prob for h in r.hits)
    cut = probs[len(probs) // 2]
    r2 = engine.search_sync(SearchRequest(**{**base.__dict__, "min_match": cut}))
    assert r2.hits and all(h.itm_prob >= cut for h in r2.hits)
    assert len(r2.hits) < len(r.hits)


def test_fusion_defaults_to_the_rerankers_own(engine: SearchEngine) -> None:
    assert engine.cross is not None and engine.cross.info.default_fusion == "itm"
    assert engine.models_info().default_fusion == "itm"
    req = SearchRequest(collection="plain", text="two blue squares", k=8, candidates=16)
    assert engine.search_sync(req).fusion == "itm"
    # a reranker whose measured default is logit + cosine (BLIP's convention) sorts that way unasked; the
    # cross-encoder is the session's shared model, so its info is restored whatever happens
    cross_info = engine.cross.info
    try:
        engine.cross.info = replace(cross_info, default_fusion="itm+itc")
        r = engine.search_sync(req)
        assert r.fusion == "itm+itc" and engine.models_info().default_fusion == "itm+itc"
        assert all(h.score == pytest.approx(h.itm_logit + h.itc, abs=1e-5) for h in r.hits)
        # an explicit choice still wins
        assert engine.search_sync(replace(req, fusion="itm")).fusion == "itm"
    finally:
        engine.cross.info = cross_info


def test_fusion_with_the_itc_logit(engine: SearchEngine) -> None:
    """``itm+itc_logit`` adds the cosine on the dual encoder's logit scale (1 / temperature); a dual encoder
    without one refuses it when asked and falls back to ``itm+itc`` when it is only the reranker's default."""
    assert engine.dual is not None and engine.cross is not None
    scale = engine.dual.info.itc_logit_scale
    assert scale is not None and scale > 1
    req = SearchRequest(collection="plain", text="two blue squares", k=16, candidates=16)
    r = engine.search_sync(replace(req, fusion="itm+itc_logit"))
    assert r.fusion == "itm+itc_logit" and r.reranked
    for h in r.hits:
        assert h.score == pytest.approx(h.itm_logit + h.itc * scale, rel=1e-5, abs=1e-4)
    assert [h.score for h in r.hits] == sorted((h.score for h in r.hits), reverse=True)
    dual_info, cross_info = engine.dual.info, engine.cross.info
    try:
        engine.cross.info = replace(cross_info, default_fusion="itm+itc_logit")
        assert engine.search_sync(req).fusion == "itm+itc_logit"
        engine.dual.info = replace(dual_info, itc_logit_scale=None)
        with pytest.raises(InvalidInputError, match="logit scale"):
            engine.search_sync(replace(req, fusion="itm+itc_logit"))
        assert engine.search_sync(req).fusion == "itm+itc"
    finally:
        engine.dual.info, engine.cross.info = dual_info, cross_info


def test_rerank_off_is_dual_encoder_order(engine: SearchEngine) -> None:
    r = engine.search_sync(SearchRequest(collection="plain", text="a green star", k=6, rerank=False))
    assert not r.reranked and r.pairs_scored == 0
    assert all(h.itm_prob is None and h.rank == h.rank_itc for h in r.hits)
    assert [h.itc for h in r.hits] == sorted((h.itc for h in r.hits), reverse=True)


def test_image_to_text_and_same_modality(engine: SearchEngine, world: World) -> None:
    img = world.image_bytes(3)
    r = engine.search_sync(SearchRequest(collection="plain", image=img, k=4, candidates=12))
    assert (r.query, r.target, r.reranked, r.pairs_scored) == ("image", "text", True, 12)
    assert all(h.kind == "text" and h.caption for h in r.hits)
    ii = engine.search_sync(SearchRequest(collection="plain", image=img, target="image", k=3))
    assert not ii.reranked and ii.hits[0].itc == pytest.approx(1.0, abs=1e-4)
    assert ii.hits[0].uri.endswith("000003.png")
    caption = r.hits[0].caption
    tt = engine.search_sync(SearchRequest(collection="plain", text=caption, target="text", k=3))
    assert (
        not tt.reranked and tt.hits[0].caption == caption and tt.hits[0].itc == pytest.approx(1.0, abs=1e-4)
    )
    with pytest.raises(InvalidInputError):
        engine.search_sync(SearchRequest(collection="plain", text="x", target="text", rerank=True))


def test_feature_cache_and_recomputed_states_score_alike(engine: SearchEngine) -> None:
    q = SearchRequest(collection="scenes", text="a small yellow cross", k=8, candidates=24)
    cached = engine.search_sync(q)
    recomputed = engine.search_sync(SearchRequest(**{**q.__dict__, "collection": "plain"}))
    assert [h.uri for h in cached.hits] == [h.uri for h in recomputed.hits]
    np.testing.assert_allclose(
        [h.itm_logit for h in cached.hits], [h.itm_logit for h in recomputed.hits], atol=1e-4
    )
    again = engine.search_sync(SearchRequest(**{**q.__dict__, "collection": "plain"}))  # memory LRU now
    np.testing.assert_allclose(
        [h.itm_logit for h in again.hits], [h.itm_logit for h in recomputed.hits], atol=1e-5
    )
    text = engine.metrics.registry.get_sample_value
    assert text("alignfuse_rerank_image_states_total", {"source": "feature_cache"}) >= 24
    assert text("alignfuse_rerank_image_states_total", {"source": "recomputed"}) >= 24
    assert text("alignfuse_rerank_image_states_total", {"source": "memory"}) >= 24


def test_unreadable_candidate_falls_back_to_itc_and_is_flagged(
    engine: SearchEngine, world: World, root: Path
) -> None:
    coll = Collection.open(root / "plain")
    victim = coll.list(kind="image", limit=1)[0]
    coll.close()
    # the stored image disappears (and is not in the memory cache yet)
    moved = Path(victim.uri).with_suffix(".gone")
    Path(victim.uri).rename(moved)
    try:
        r = engine.search_sync(SearchRequest(collection="plain", text="anything", k=64, candidates=64))
    finally:
        moved.rename(victim.uri)
    flagged = [h for h in r.hits if h.rerank_failed]
    assert [h.id for h in flagged] == [victim.id]
    assert flagged[0].itm_prob is None and flagged[0].score == pytest.approx(flagged[0].itc)
    assert r.pairs_scored == r.candidates - 1
    assert all(h.itm_prob is not None for h in r.hits if not h.rerank_failed)


def test_add_and_delete_are_committed_and_searchable(engine: SearchEngine) -> None:
    before = engine.collection_info("plain")
    img = png_bytes((50, 40), (10, 200, 90))
    res = asyncio.run(
        engine.add_images("plain", [ImageUpload(img, "green.png", "a green block", {"src": "t"})])
    )
    assert res.added == 1 and res.version == before.version + 1
    new_id = res.ids[0]
    hit = engine.search_sync(SearchRequest(collection="plain", image=img, target="image", k=1)).hits[0]
    assert hit.id == new_id and hit.caption == "a green block" and hit.metadata["src"] == "t"
    assert engine.thumbnail("plain", new_id)[:2] == b"\xff\xd8"
    # the same bytes again: no new item, the existing id
    dup = asyncio.run(engine.add_images("plain", [ImageUpload(img)]))
    assert (dup.added, dup.duplicates, dup.ids) == (0, 1, [new_id])
    t = asyncio.run(
        engine.add_texts("plain", [TextUpload("a sentence nobody wrote before"), TextUpload("another one")])
    )
    assert t.added == 2 and t.version == res.version + 1
    tt = engine.search_sync(SearchRequest(collection="plain", text="another one", target="text", k=1))
    assert tt.hits[0].id == t.ids[1]
    d = asyncio.run(engine.delete_item("plain", new_id))
    assert d.version == t.version + 1
    after = engine.search_sync(SearchRequest(collection="plain", image=img, target="image", k=3))
    assert new_id not in [h.id for h in after.hits]
    with pytest.raises(NotFoundError):
        engine.get_item("plain", new_id)
    with pytest.raises(NotFoundError):
        asyncio.run(engine.delete_item("plain", new_id))


def test_feature_cache_collection_gets_tokens_for_uploads(engine: SearchEngine) -> None:
    img = png_bytes((30, 30), (250, 250, 0))
    res = asyncio.run(engine.add_images("scenes", [ImageUpload(img, "y.png")]))
    coll = Collection.open(engine.root / "scenes")
    try:
        assert coll.features is not None and res.ids[0] in coll.features
    finally:
        coll.close()


def test_picks_up_versions_committed_by_another_writer(
    engine: SearchEngine, world: World, root: Path
) -> None:
    v0 = engine.search_sync(SearchRequest(collection="plain", text="x", k=1)).version
    coll = Collection.open(root / "plain", encoder=world.dual.info)
    vec = world.dual.encode_texts(["a text committed by another process"])
    with coll.writer() as w:
        (new_id,) = w.add(
            [
                NewItem(
                    kind="text", uri="text:ext", sha256="e" * 64, text="a text committed by another process"
                )
            ],
            vec,
        )
        w.commit()
    coll.close()
    r = engine.search_sync(
        SearchRequest(collection="plain", text="a text committed by another process", target="text", k=1)
    )
    assert r.version == v0 + 1 and r.hits[0].id == int(new_id)


def test_validation_and_lookup_errors(engine: SearchEngine) -> None:
    bad = [
        SearchRequest(collection="plain"),
        SearchRequest(collection="plain", text="x", image=b"y"),
        SearchRequest(collection="plain", text="   "),
        SearchRequest(collection="plain", text="x" * 1001),
        SearchRequest(collection="plain", text="x", k=0),
        SearchRequest(collection="plain", text="x", k=101),
        SearchRequest(collection="plain", text="x", candidates=513),
        SearchRequest(collection="plain", text="x", min_match=1.5),
    ]
    for req in bad:
        with pytest.raises(InvalidInputError):
            engine.search_sync(req)
    with pytest.raises(NotFoundError):
        engine.search_sync(SearchRequest(collection="nope", text="x"))
    with pytest.raises(NotFoundError):
        engine.search_sync(SearchRequest(collection="../plain", text="x"))
    with pytest.raises(EncoderMismatchError):
        engine.search_sync(SearchRequest(collection="foreign", text="x"))
    infos = {c.name: c for c in engine.list_collections()}
    assert infos["foreign"].compatible is False and infos["plain"].compatible is True
    assert infos["scenes"].feature_cache and not infos["plain"].feature_cache


def test_not_ready_until_loaded_and_specs_from_manifests(world: World, root: Path) -> None:
    settings = make_settings(root, models={"dual_encoder": None, "reranker": "none"})
    e = SearchEngine(settings)
    with pytest.raises(NotReadyError):
        e.search_sync(SearchRequest(collection="plain", text="x"))
    dual, rr = e.model_specs()
    assert dual == "alignfuse:random-tiny"  # two collections use it, one ("foreign") albef:tiny
    assert rr is None  # "none" switches reranking off
    e.close()
    e2 = SearchEngine(make_settings(root, models={"dual_encoder": None, "reranker": None}))
    assert e2.model_specs() == ("alignfuse:random-tiny", "albef:tiny")  # "scenes" records its reranker
    e2.close()


def _cosine_to_image(dual: object, text: str, image: Path) -> float:
    """The cosine of ``text`` and ``image`` by ``dual`` itself (what the index's ITC score must equal)."""
    from PIL import Image

    t = dual.encode_texts([text])  # type: ignore[attr-defined]
    px = dual.image_transform(Image.open(image).convert("RGB")).unsqueeze(0)  # type: ignore[attr-defined]
    return float((t @ dual.encode_images(px).T)[0, 0])  # type: ignore[attr-defined]


def test_collections_of_two_dual_encoders_each_search_with_their_own(world: World, root: Path) -> None:
    """One engine, collections built by two dual encoders of different dimension: each query is encoded by
    the encoder of the collection it searches (a wrong one could not even be searched: dims differ), the
    one reranker serves both, uploads are encoded by the collection's encoder too."""
    assert world.dual.embed_dim != world.other_dual.embed_dim
    e = SearchEngine(
        make_settings(root),
        dual_encoder=world.dual,
        cross_encoder=world.cross,
        dual_encoders=[world.other_dual],
    )
    e.load()
    try:
        info = e.models_info()
        assert info.dual_encoder == "alignfuse:random-tiny"
        assert sorted(info.dual_encoders) == ["albef:tiny", "alignfuse:random-tiny"]
        infos = {c.name: c for c in e.list_collections()}
        assert infos["foreign"].compatible and infos["plain"].compatible
        assert (infos["foreign"].dual_encoder, infos["foreign"].dim) == (
            "albef:tiny",
            world.other_dual.embed_dim,
        )
        assert (infos["plain"].dual_encoder, infos["plain"].dim) == (
            "alignfuse:random-tiny",
            world.dual.embed_dim,
        )
        q = "a small red circle left of a blue square"
        for name, dual in (("foreign", world.other_dual), ("plain", world.dual)):
            r = e.search_sync(SearchRequest(collection=name, text=q, k=3, candidates=8, include_itc=True))
            assert r.reranked and r.pairs_scored == 8
            top = r.itc_hits[0]  # type: ignore[index]
            image = world.data / "images" / Path(top.uri).name
            assert top.itc == pytest.approx(_cosine_to_image(dual, q, image), abs=1e-4)
            # an image query too: the collection's encoder embeds the query image (itself: cosine 1)
            img = world.image_bytes(4)
            ii = e.search_sync(SearchRequest(collection=name, image=img, target="image", k=1))
            assert ii.hits[0].uri.endswith("000004.png") and ii.hits[0].itc == pytest.approx(1.0, abs=1e-4)
        # the same query gives different ITC scores on the two collections (two models, not one)
        a = e.search_sync(SearchRequest(collection="foreign", text=q, k=24, rerank=False))
        b = e.search_sync(SearchRequest(collection="plain", text=q, k=24, rerank=False))
        by_uri = {Path(h.uri).name: h.itc for h in b.hits}
        assert any(abs(h.itc - by_uri[Path(h.uri).name]) > 1e-3 for h in a.hits)
        # texts added to "foreign" are encoded by its own encoder: found again with cosine 1
        added = asyncio.run(e.add_texts("foreign", [TextUpload("a line only foreign holds")]))
        tt = e.search_sync(
            SearchRequest(collection="foreign", text="a line only foreign holds", target="text", k=1)
        )
        assert tt.hits[0].id == added.ids[0] and tt.hits[0].itc == pytest.approx(1.0, abs=1e-4)
    finally:
        e.close()


def test_engine_loads_one_dual_encoder_per_collection_encoder(world: World, root: Path) -> None:
    """Loaded from the settings (nothing injected): the configured dual encoder plus the one "foreign"
    was built with; a collection whose encoder cannot be loaded is a 409 naming why, the rest are served."""
    import json
    import shutil

    broken = root / "broken"
    shutil.copytree(root / "plain", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["encoder"]["spec"] = "alignfuse:no-such-model"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    e = SearchEngine(make_settings(root, models={"warmup": False}))
    e.load()
    try:
        assert sorted(e.duals) == ["albef:tiny", "alignfuse:random-tiny"]
        assert e.models_info().dual_encoder == "alignfuse:random-tiny"
        for name in ("foreign", "plain"):
            r = e.search_sync(SearchRequest(collection=name, text="a blue square", k=2, candidates=4))
            assert len(r.hits) == 2 and r.reranked
        with pytest.raises(EncoderMismatchError, match="alignfuse:no-such-model.*loading it failed"):
            e.search_sync(SearchRequest(collection="broken", text="a blue square"))
        infos = {c.name: c for c in e.list_collections()}
        assert infos["broken"].compatible is False and "loading it failed" in (infos["broken"].error or "")
        assert infos["foreign"].compatible is True
    finally:
        e.close()
