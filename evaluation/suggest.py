"""Queries worth suggesting, with the measured effect of the rerank on each (issue 17: the demo tells the truth).

Given a gallery (image key -> drawn objects, as the built-in scenes list them) and a search function that
returns, for a query, the dual encoder's order and the reranked order (as gallery keys), :func:`suggest_queries`
phrases probe queries from what the gallery draws (:func:`alignfuse.data.scenes.probe_queries`: "a red
circle", "a circle", "two red circles", "a red circle left of a blue square"), keeps those with at least
``min_true`` true images in the gallery, runs each once and measures, for both orders, the truth-aware
precision@k (share of the top k that make the query true) and the rank of the first true image.

No HTTP and no settings: the caller adapts its engine (the demo: ``SearchEngine.search_sync`` with
``include_itc=True`` gives both orders in one call) into a :data:`SearchFn`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignfuse.errors import InvalidInputError, NotFoundError

from .data import TruthFn

#: the query kinds, in order (the same as :data:`alignfuse.data.scenes.PROBE_KINDS`)
KINDS: tuple[str, ...] = ("colour_shape", "shape", "count", "relation")


@dataclass(frozen=True)
class Ranked:
    """One query's results as gallery keys, best first: the dual encoder's order (ITC alone) and the final
    order after the rerank."""

    dual: Sequence[str]
    rerank: Sequence[str]


#: query text -> its two orders
SearchFn = Callable[[str], Ranked]


def precision_at(order: Sequence[str], true_keys: frozenset[str] | set[str], k: int) -> float:
    """Truth-aware precision@k: the share of the first ``k`` keys that are true (a list shorter than ``k``
    counts its missing places as misses)."""
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    return sum(1 for key in list(order)[:k] if key in true_keys) / k


def first_true(order: Sequence[str], true_keys: frozenset[str] | set[str]) -> int | None:
    """1-based rank of the first true key in ``order`` (None: none of the returned keys is true)."""
    for n, key in enumerate(order, start=1):
        if key in true_keys:
            return n
    return None


@dataclass(frozen=True)
class QueryEffect:
    """One query, measured: truth-aware precision@k and first true rank, dual encoder vs rerank."""

    query: str
    kind: str
    n_true: int
    k: int
    precision_dual: float
    precision_rerank: float
    first_true_dual: int | None
    first_true_rerank: int | None

    @property
    def gain(self) -> float:
        """precision_rerank - precision_dual."""
        return self.precision_rerank - self.precision_dual

    def _moved(self) -> int:
        """> 0 when the rerank moved the first true image up, < 0 down (a missing one ranks below all)."""
        big = 1 << 30
        a = self.first_true_dual if self.first_true_dual is not None else big
        b = self.first_true_rerank if self.first_true_rerank is not None else big
        return a - b

    @property
    def helps(self) -> bool:
        """The rerank raised precision@k, or kept it and moved the first true image up."""
        return self.gain > 0 or (self.gain == 0 and self._moved() > 0)

    @property
    def hurts(self) -> bool:
        """The rerank lowered precision@k, or kept it and moved the first true image down."""
        return self.gain < 0 or (self.gain == 0 and self._moved() < 0)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["gain"] = round(self.gain, 6)
        d["helps"], d["hurts"] = self.helps, self.hurts
        return d


def measure(query: str, kind: str, true_keys: frozenset[str], ranked: Ranked, k: int) -> QueryEffect:
    """The :class:`QueryEffect` of one query's two orders against its true images."""
    return QueryEffect(
        query=query,
        kind=kind,
        n_true=len(true_keys),
        k=k,
        precision_dual=precision_at(ranked.dual, true_keys, k),
        precision_rerank=precision_at(ranked.rerank, true_keys, k),
        first_true_dual=first_true(ranked.dual, true_keys),
        first_true_rerank=first_true(ranked.rerank, true_keys),
    )


def gallery_from_karpathy(karpathy_file: str | Path) -> dict[str, tuple[dict[str, Any], ...]]:
    """A scenes JSON's images keyed by file name (``Path(entry["image"]).name``) -> their drawn objects."""
    path = Path(karpathy_file)
    if not path.is_file():
        raise NotFoundError(f"Karpathy file {path} does not exist")
    out: dict[str, tuple[dict[str, Any], ...]] = {}
    for entry in json.loads(path.read_text()):
        objects = entry.get("objects")
        if objects is None:
            raise InvalidInputError(f"{path}: image {entry.get('image')!r} lists no drawn objects")
        out[Path(entry["image"]).name] = tuple(objects)
    return out


def true_keys_of(
    query: str, gallery: Mapping[str, Sequence[Mapping[str, Any]]], truth: TruthFn
) -> frozenset[str]:
    """The gallery keys whose drawn objects make ``query`` true."""
    return frozenset(key for key, objs in gallery.items() if truth(query, objs))  # type: ignore[arg-type]


def _sort_key(e: QueryEffect) -> tuple[int, float, int, str, str]:
    tier = 0 if e.helps else (2 if e.hurts else 1)
    return (tier, -e.gain, -max(min(e._moved(), 1 << 20), -(1 << 20)), e.kind, e.query)


def suggest_queries(
    gallery: Mapping[str, Sequence[Mapping[str, Any]]],
    search: SearchFn,
    *,
    k: int = 5,
    min_true: int = 1,
    kinds: Sequence[str] = KINDS,
    max_per_kind: int | None = 40,
    truth: TruthFn | None = None,
) -> list[QueryEffect]:
    """Every probe query of ``kinds`` with at least ``min_true`` true images in ``gallery`` (at most
    ``max_per_kind`` per kind: the first that qualify in a fixed-seed shuffled order), run once through ``search`` and
    measured; sorted best suggestion first: those the rerank helps, then neutral, then those it hurts; within a
    tier by precision gain, then by how far the first true image moved up.

    ``truth`` judges a query against an image's drawn objects (default: the scenes'
    :func:`~alignfuse.data.scenes.caption_matches`, which counts exactly: "a red circle" is false of a scene
    with two)."""
    from alignfuse.data.scenes import SceneObject, caption_matches, probe_queries

    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    if min_true < 1:
        raise InvalidInputError(f"min_true must be >= 1, got {min_true}")
    if max_per_kind is not None and max_per_kind < 1:
        raise InvalidInputError(f"max_per_kind must be >= 1 or None, got {max_per_kind}")
    unknown = [kd for kd in kinds if kd not in KINDS]
    if unknown:
        raise InvalidInputError(f"unknown query kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    phrased = probe_queries(gallery.values())  # type: ignore[arg-type]
    judged: Mapping[str, Sequence[Any]] = gallery
    if truth is None:  # the scenes' own judge takes objects as they are: convert once, not per query
        judged = {key: tuple(SceneObject(**o) for o in objs) for key, objs in gallery.items()}
    judge: TruthFn = truth if truth is not None else caption_matches
    effects: list[QueryEffect] = []
    for kind in dict.fromkeys(kinds):
        texts = phrased[kind]
        # a fixed-seed order; the first max_per_kind with enough true images are kept (judging every one of
        # ~2,000 relation queries of a 1,000-image gallery would cost minutes)
        order = (
            np.random.default_rng(0).permutation(len(texts))
            if max_per_kind is not None
            else range(len(texts))
        )
        kept: list[tuple[int, str, frozenset[str]]] = []
        for i in order:
            if max_per_kind is not None and len(kept) >= max_per_kind:
                break
            keys = true_keys_of(texts[int(i)], judged, judge)
            if len(keys) >= min_true:
                kept.append((int(i), texts[int(i)], keys))
        for _i, q, keys in sorted(kept):
            effects.append(measure(q, kind, keys, search(q), k))
    return sorted(effects, key=_sort_key)


def summarise(effects: Sequence[QueryEffect]) -> dict[str, Any]:
    """Counts and means over measured queries: how often the rerank helped / hurt, mean precision both ways,
    overall and per kind."""

    def block(es: Sequence[QueryEffect]) -> dict[str, Any]:
        n = len(es)
        return {
            "queries": n,
            "helps": sum(e.helps for e in es),
            "hurts": sum(e.hurts for e in es),
            "precision_dual": round(float(np.mean([e.precision_dual for e in es])), 4) if n else None,
            "precision_rerank": round(float(np.mean([e.precision_rerank for e in es])), 4) if n else None,
        }

    out = block(effects)
    out["by_kind"] = {kd: block([e for e in effects if e.kind == kd]) for kd in KINDS}
    return out
