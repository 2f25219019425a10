"""Suggested queries: probe phrasing, truth of each query over a gallery, exact precision on constructed cases."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from alignfuse.data.scenes import (
    SceneObject,
    caption_matches,
    parse_caption,
    probe_queries,
    sample_scenes,
    shows,
)
from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.evaluation.suggest import (
    KINDS,
    QueryEffect,
    Ranked,
    first_true,
    gallery_from_karpathy,
    measure,
    precision_at,
    suggest_queries,
    summarise,
)

from .reference import brute_precision


def _obj(shape: str, colour: str, x: float, y: float = 0.5) -> dict:
    return asdict(SceneObject(shape, colour, "small", x, y, 0.14))


# a: one red circle left of a blue square; b: two red circles; c: a red circle alone; d: a green star;
# e: a blue square left of a red circle
GALLERY = {
    "a.png": (_obj("circle", "red", 0.2), _obj("square", "blue", 0.8)),
    "b.png": (_obj("circle", "red", 0.2), _obj("circle", "red", 0.8)),
    "c.png": (_obj("circle", "red", 0.5),),
    "d.png": (_obj("star", "green", 0.5),),
    "e.png": (_obj("square", "blue", 0.2), _obj("circle", "red", 0.8)),
}


def test_probe_queries_parse_and_cover_the_gallery() -> None:
    q = probe_queries(GALLERY.values())
    assert set(q) == set(KINDS)
    assert q["colour_shape"] == ["a blue square", "a green star", "a red circle"]
    assert q["shape"] == ["a circle", "a square", "a star"]
    assert q["count"] == ["two red circles"]
    assert q["relation"] == [
        "a blue square left of a red circle",
        "a blue square right of a red circle",
        "a red circle left of a blue square",
        "a red circle right of a blue square",
    ]
    for kind, queries in q.items():
        for text in queries:
            claim = parse_caption(text)
            assert claim.mentions or claim.attributes, text
            # every probe is true of some gallery image (built from what the gallery draws)
            assert any(caption_matches(text, objs) for objs in GALLERY.values()), (kind, text)
    # real scenes: every probe parses and is true of at least one of the scenes it was built from
    specs = sample_scenes(3, 40, "test")
    scenes = [s.objects for s in specs]
    real = probe_queries(scenes)
    assert all(real[k] for k in KINDS)
    for queries in real.values():
        for text in queries[:25]:
            assert any(caption_matches(text, objs) for objs in scenes), text


def test_shows_is_presence_whatever_the_count() -> None:
    two = GALLERY["b.png"]
    assert shows(two, "red", "circle") and not caption_matches("a red circle", two)
    assert shows(two, colour="red") and shows(two, shape="circle") and not shows(two, "blue", "circle")
    assert not shows(two)


def test_precision_and_first_true_exact() -> None:
    order = ["x", "t1", "y", "t2", "z", "t3"]
    true = {"t1", "t2", "t3"}
    assert precision_at(order, true, 5) == pytest.approx(2 / 5) == brute_precision(order, true, 5)
    assert precision_at(order, true, 1) == 0.0 and precision_at(order, true, 6) == pytest.approx(0.5)
    assert precision_at(order[:2], true, 5) == pytest.approx(1 / 5)  # missing places are misses
    assert first_true(order, true) == 2 and first_true(["x"], true) is None
    with pytest.raises(InvalidInputError):
        precision_at(order, true, 0)
    e = measure("q", "shape", frozenset(true), Ranked(order, ["t1", "t2", "x", "y", "z"]), 5)
    assert (e.precision_dual, e.precision_rerank) == (pytest.approx(0.4), pytest.approx(0.4))
    assert e.gain == 0 and e.helps and not e.hurts  # same precision, first true image moved 2 -> 1
    worse = measure("q", "shape", frozenset(true), Ranked(["t1"], ["x"]), 1)
    assert worse.hurts and not worse.helps and worse.first_true_rerank is None
    assert json.loads(json.dumps(e.to_json()))["helps"] is True


def test_suggest_queries_on_a_constructed_case() -> None:
    calls: list[str] = []
    keys = sorted(GALLERY)

    def search(query: str) -> Ranked:
        calls.append(query)
        true = [k for k in keys if caption_matches(query, GALLERY[k])]
        false = [k for k in keys if k not in true]
        # dual: false images first; rerank: true images first, except for the shape queries (reversed)
        if query in ("a circle", "a square", "a star"):
            return Ranked(dual=true + false, rerank=false + true)
        return Ranked(dual=false + true, rerank=true + false)

    effects = suggest_queries(GALLERY, search, k=2)
    assert sorted(calls) == sorted(q for qs in probe_queries(GALLERY.values()).values() for q in qs)
    by_query = {e.query: e for e in effects}
    red = by_query["a red circle"]  # exactly one red circle: a, c, e (b has two)
    assert red.n_true == 3 and red.kind == "colour_shape"
    assert (red.precision_dual, red.precision_rerank) == (0.0, 1.0)  # dual: b, d first; rerank: a, c
    assert (red.first_true_dual, red.first_true_rerank) == (3, 1) and red.helps
    two = by_query["two red circles"]
    assert two.n_true == 1 and (two.precision_dual, two.precision_rerank) == (0.0, 0.5)
    assert two.first_true_dual == 5 and two.first_true_rerank == 1 and two.helps
    circle = by_query["a circle"]
    assert circle.n_true == 4 and circle.hurts and circle.precision_rerank == 0.5
    # order: every query the rerank helps, then neutral, then those it hurts; the biggest gain first
    tiers = [0 if e.helps else (2 if e.hurts else 1) for e in effects]
    assert tiers == sorted(tiers) and effects[0].gain == max(e.gain for e in effects)
    s = summarise(effects)
    assert s["queries"] == len(effects) and s["hurts"] == 3 and s["helps"] == len(effects) - 3
    assert s["by_kind"]["shape"]["hurts"] == 3 and s["by_kind"]["count"]["queries"] == 1
    # min_true filters, max_per_kind samples, kinds selects
    few = suggest_queries(GALLERY, search, k=2, min_true=3, kinds=("colour_shape",))
    assert {e.query for e in few} == {"a red circle"}
    sampled = suggest_queries(GALLERY, search, kinds=("relation",), max_per_kind=2)
    assert len(sampled) == 2 and all(e.kind == "relation" for e in sampled)
    with pytest.raises(InvalidInputError):
        suggest_queries(GALLERY, search, kinds=("colour",))
    with pytest.raises(InvalidInputError):
        suggest_queries(GALLERY, search, min_true=0)


def test_gallery_from_karpathy(tmp_path: Path) -> None:
    from alignfuse.data.scenes import generate_scenes

    path = generate_scenes(tmp_path / "s", seed=3, count=6, split="test", size=32)
    gallery = gallery_from_karpathy(path)
    entries = json.loads(path.read_text())
    assert list(gallery) == [Path(e["image"]).name for e in entries]
    assert all(gallery[Path(e["image"]).name] == tuple(e["objects"]) for e in entries)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.png", "caption": ["a"]}]))
    with pytest.raises(InvalidInputError):
        gallery_from_karpathy(bad)
    with pytest.raises(NotFoundError):
        gallery_from_karpathy(tmp_path / "missing.json")


def test_query_effect_is_frozen() -> None:
    e = QueryEffect("q", "shape", 1, 5, 0.2, 0.4, 3, 1)
    with pytest.raises(AttributeError):
        e.query = "other"  # type: ignore[misc]
    assert e.gain == pytest.approx(0.2) and e.helps
