"""What ``alignfuse demo`` measures and prints about its pipelines, truth-aware.

A hit counts when the image makes the query true, judged from the objects drawn in it (the scenes'
``objects``), not only when it is the image the caption was written for: ~37% of the scenes' captions are
true of other images too. Per pipeline (one collection each, its own dual encoder, the one reranker):

- over test captions: truth-aware R@1 / R@5 of the dual encoder's order and of the reranked order, and how
  often the rerank moved the first true image up or down;
- suggested queries (:func:`alignfuse.evaluation.suggest.suggest_queries`): probe queries true of at least one
  image of the collection, measured; those where the rerank helps are written to the collection's
  ``suggestions.json`` for the page (``GET /v1/collections/{name}/suggestions``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignfuse.data.scenes.truth import caption_matches
from alignfuse.evaluation.suggest import QueryEffect, Ranked, gallery_from_karpathy, suggest_queries

from ..engine.collections import SUGGESTIONS_FILE
from ..types import SearchRequest, SearchResponse, Suggestion

Gallery = Mapping[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Pipeline:
    """One collection of the demo: its name, the dual encoder that built it and the reranker."""

    collection: str
    dual: str
    reranker: str

    @property
    def label(self) -> str:
        return f"{self.dual} → {self.reranker}"


@dataclass(frozen=True)
class CaptionProbe:
    """Truth-aware figures of one pipeline over ``n`` test captions (percentages for R@K)."""

    n: int
    k: int
    candidates: int
    r1_dual: float
    r5_dual: float
    r1_rerank: float
    r5_rerank: float
    up: int  # captions whose first true image the rerank moved up
    down: int
    own_up: int  # the same, judged by the caption's own image only (ALBEF's protocol)
    own_down: int


@dataclass(frozen=True)
class PipelineReport:
    pipeline: Pipeline
    probe: CaptionProbe
    effects: list[QueryEffect]
    suggested: list[QueryEffect]  # where the rerank helps, best first (what the page offers)


def _ranked(r: SearchResponse) -> Ranked:
    return Ranked(
        dual=[Path(h.uri).name for h in (r.itc_hits or [])], rerank=[Path(h.uri).name for h in r.hits]
    )


def search_fn(engine: Any, collection: str, *, k: int, candidates: int) -> Callable[[str], Ranked]:
    """query → both orders of one reranked search (the dual encoder's top k and the reranked top k)."""

    def run(text: str) -> Ranked:
        req = SearchRequest(
            collection=collection, text=text, k=k, candidates=candidates, rerank=True, include_itc=True
        )
        return _ranked(engine.search_sync(req))

    return run


def _first(order: Sequence[str], hit: Callable[[str], bool]) -> int | None:
    for i, key in enumerate(order, start=1):
        if hit(key):
            return i
    return None


def _moved(a: int | None, b: int | None, k: int) -> int:
    """+1 when ``b`` (after the rerank) is better than ``a``, -1 when worse, 0 when the same."""
    x, y = (k + 1 if a is None else a), (k + 1 if b is None else b)
    return (y < x) - (y > x)


def probe_captions(
    search: Callable[[str], Ranked],
    karpathy: Path,
    gallery: Gallery,
    *,
    probe: int,
    k: int,
    candidates: int,
) -> CaptionProbe:
    """The first caption of each of the first ``probe`` test scenes, searched once (both orders)."""
    entries = json.loads(karpathy.read_text())[:probe]
    r1d = r5d = r1r = r5r = up = down = own_up = own_down = 0
    for entry in entries:
        cap = entry["caption"]
        caption = cap[0] if isinstance(cap, list) else cap
        own = Path(entry["image"]).name
        r = search(caption)

        def true(key: str, caption: str = caption) -> bool:
            return key in gallery and caption_matches(caption, gallery[key])

        fd, fr = _first(r.dual, true), _first(r.rerank, true)
        r1d += fd == 1
        r5d += fd is not None and fd <= 5
        r1r += fr == 1
        r5r += fr is not None and fr <= 5
        m = _moved(fd, fr, k)
        up, down = up + (m > 0), down + (m < 0)
        mo = _moved(_first(r.dual, own.__eq__), _first(r.rerank, own.__eq__), k)
        own_up, own_down = own_up + (mo > 0), own_down + (mo < 0)
    n = max(len(entries), 1)
    return CaptionProbe(
        n=len(entries),
        k=k,
        candidates=candidates,
        r1_dual=100.0 * r1d / n,
        r5_dual=100.0 * r5d / n,
        r1_rerank=100.0 * r1r / n,
        r5_rerank=100.0 * r5r / n,
        up=up,
        down=down,
        own_up=own_up,
        own_down=own_down,
    )


def to_suggestion(e: QueryEffect) -> Suggestion:
    return Suggestion(
        text=e.query,
        kind=e.kind,
        n_true=e.n_true,
        k=e.k,
        precision_dual=e.precision_dual,
        precision_rerank=e.precision_rerank,
        first_true_dual=e.first_true_dual,
        first_true_rerank=e.first_true_rerank,
    )


def write_suggestions(collection_dir: Path, effects: Sequence[QueryEffect], pipeline: Pipeline) -> Path:
    """``<collection>/suggestions.json`` (atomically): what the page offers as clickable queries."""
    path = collection_dir / SUGGESTIONS_FILE
    body = {
        "pipeline": {"dual_encoder": pipeline.dual, "reranker": pipeline.reranker},
        "suggestions": [to_suggestion(e).model_dump() for e in effects],
    }
    fd, tmp = tempfile.mkstemp(dir=collection_dir, prefix=".suggestions.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def measure(
    engine: Any,
    pipeline: Pipeline,
    karpathy: Path,
    collection_dir: Path,
    *,
    probe: int = 80,
    k: int = 10,
    candidates: int = 64,
    suggest_k: int = 5,
    max_suggestions: int = 12,
) -> PipelineReport:
    """Measure one pipeline (its collection on ``engine``) and write its suggestions file."""
    gallery = gallery_from_karpathy(karpathy)
    search = search_fn(engine, pipeline.collection, k=k, candidates=candidates)
    cp = probe_captions(search, karpathy, gallery, probe=probe, k=k, candidates=candidates)
    effects = suggest_queries(gallery, search, k=suggest_k)
    helped = [e for e in effects if e.helps and e.n_true >= 1][:max_suggestions]
    write_suggestions(collection_dir, helped, pipeline)
    return PipelineReport(pipeline, cp, list(effects), helped)


def _rank(r: int | None) -> str:
    return "none" if r is None else f"#{r}"


def summary_lines(reports: Sequence[PipelineReport], examples: int) -> list[str]:
    """The printed summary: per pipeline, truth-aware R@1/R@5 and how often the rerank moved the first
    true image up or down; then the suggested queries."""
    if not reports:
        return []
    p0 = reports[0].probe
    out = [
        "",
        f"Truth-aware retrieval on {p0.n} test captions (a hit: an image that makes the caption true, judged "
        f"from its drawn objects; top {p0.k} of {p0.candidates} candidates):",
    ]
    for rep in reports:
        p = rep.probe
        out += [
            f"  {rep.pipeline.collection} ({rep.pipeline.label})",
            f"    R@1 {p.r1_dual:.1f} -> {p.r1_rerank:.1f}, R@5 {p.r5_dual:.1f} -> {p.r5_rerank:.1f} "
            "(dual encoder -> reranked)",
            f"    the ITM rerank moved the first true image up for {p.up} captions and down for {p.down} "
            f"(the caption's own image: up {p.own_up}, down {p.own_down})",
        ]
    for rep in reports:
        e = rep.effects
        up, down = sum(x.helps for x in e), sum(x.hurts for x in e)
        out.append(
            f"\nSuggested queries for {rep.pipeline.collection}: of {len(e)} probe queries true of at least one "
            f"image here, the rerank helped {up} and hurt {down} (precision@{rep.effects[0].k if e else 5}, "
            "then the first true image)."
        )
        if not rep.suggested:
            out.append("  none: the rerank helped no probe query on this collection")
        for x in rep.suggested[:examples]:
            out.append(
                f"  - {x.query!r} ({x.n_true} true image{'' if x.n_true == 1 else 's'}): precision@{x.k} {x.precision_dual:.2f} -> "
                f"{x.precision_rerank:.2f}, first true image {_rank(x.first_true_dual)} -> "
                f"{_rank(x.first_true_rerank)}"
            )
    out.append("Pick the pipeline on the page; the suggestions are offered there too (or upload an image).\n")
    return out
