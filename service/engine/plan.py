"""The search plan (what one request will do, decided before any work) and the final ranking.

:func:`plan_search` checks a :class:`~alignfuse.service.types.SearchRequest` against the configured limits
and the loaded models and resolves its defaults (target modality, candidates, rerank, fusion) into a
:class:`SearchPlan`; :func:`rank` turns the candidates' scores into the hits of the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfuse.errors import InvalidInputError
from alignfuse.index.types import Item, Modality
from alignfuse.models.base import Fusion, check_fusion, default_fusion_for, fuse_scores

from ..settings import LimitSettings
from ..types import SearchHit, SearchRequest
from .handles import public_metadata, public_uri
from .kernels import RerankJob


@dataclass(frozen=True)
class SearchPlan:
    """``query``/``target``: the modalities searched from and for; ``fetch``: the candidates taken from the
    ANN index (C when reranking, else k); ``rerank``: whether the cross-encoder runs; ``fusion``: the sort key
    of reranked candidates (the request's, else the reranker's default)."""

    query: Modality
    target: Modality
    fetch: int
    rerank: bool
    fusion: Fusion


@dataclass(frozen=True)
class Candidates:
    """The ANN candidates of one query, ITC order, joined with their items and their rerank job.

    ``itc`` float32 [n] (cosines, straight from the index's result arrays); ``job``/``order``/``failed`` as
    returned by the rerank-input builders (``job`` None when nothing is to be reranked); ``ann_done``: the
    ``time.perf_counter()`` at which the ANN search and item join finished.
    """

    version: int
    items: list[Item]
    itc: np.ndarray
    job: RerankJob | None
    order: np.ndarray
    failed: np.ndarray
    ann_done: float


def plan_search(
    req: SearchRequest,
    limits: LimitSettings,
    *,
    has_reranker: bool,
    reranker_fusion: str | None,
    itc_logit_scale: float | None,
) -> SearchPlan:
    """Validate ``req`` (InvalidInputError with the allowed range as detail) and resolve its defaults."""
    lim = limits
    if (req.text is None) == (req.image is None):
        raise InvalidInputError("give exactly one of text or image", detail={"fields": ["text", "image"]})
    if req.text is not None:
        if not req.text.strip():
            raise InvalidInputError("text is empty", detail={"field": "text", "min_length": 1})
        if len(req.text) > lim.max_text_chars:
            raise InvalidInputError(
                f"text has {len(req.text)} characters, over the limit of {lim.max_text_chars}",
                detail={"field": "text", "min_length": 1, "max_length": lim.max_text_chars},
            )
    if not 1 <= req.k <= lim.max_k:
        raise InvalidInputError(
            f"k must be in [1, {lim.max_k}], got {req.k}",
            detail={"field": "k", "min": 1, "max": lim.max_k},
        )
    cand = min(lim.default_candidates, lim.max_candidates) if req.candidates is None else req.candidates
    if not 1 <= cand <= lim.max_candidates:
        raise InvalidInputError(
            f"candidates must be in [1, {lim.max_candidates}], got {cand}",
            detail={"field": "candidates", "min": 1, "max": lim.max_candidates},
        )
    if req.min_match is not None and not 0.0 <= req.min_match <= 1.0:
        raise InvalidInputError(
            f"min_match must be in [0, 1], got {req.min_match}",
            detail={"field": "min_match", "min": 0, "max": 1},
        )
    if req.fusion is not None:
        fusion = check_fusion(req.fusion, itc_logit_scale)
    else:
        fusion = check_fusion(default_fusion_for(reranker_fusion or "itm", itc_logit_scale), itc_logit_scale)
    query: Modality = "text" if req.text is not None else "image"
    target: Modality = req.target or ("image" if query == "text" else "text")
    if target not in ("image", "text"):
        raise InvalidInputError("target must be image or text", detail={"field": "target"})
    cross_modal = query != target
    if req.rerank and not cross_modal:
        raise InvalidInputError(
            f"{query}→{target} search uses the dual encoder only; rerank needs a text and an image",
            detail={"field": "rerank"},
        )
    if req.rerank and not has_reranker:
        raise InvalidInputError(
            "no reranker (cross-encoder) is loaded on this server", detail={"field": "rerank"}
        )
    rerank = cross_modal and has_reranker and req.rerank is not False
    return SearchPlan(
        query=query, target=target, fetch=max(cand, req.k) if rerank else req.k, rerank=rerank, fusion=fusion
    )


def rank(
    req: SearchRequest,
    plan: SearchPlan,
    cands: Candidates,
    logit: np.ndarray,
    prob: np.ndarray,
    itc_logit_scale: float | None,
    base: Path,
) -> tuple[list[SearchHit], list[SearchHit] | None]:
    """The top-k hits (by the fused score when reranked, else ITC; ``min_match`` applied) and, when asked,
    the top-k by ITC alone. ``base``: the collection folder (hits name files relative to it, never by
    the server's absolute path: :func:`~alignfuse.service.engine.handles.public_uri`)."""
    items, itc, failed = cands.items, cands.itc, cands.failed
    n = len(items)
    reranked = plan.rerank and n > 0
    if reranked:
        # a candidate whose image could not be read falls back to its ITC score
        fused = fuse_scores(logit, itc, plan.fusion, itc_logit_scale)
        score = np.where(np.isnan(logit), itc, fused)
    else:
        score = itc.copy()
    # stable sort by score desc; ties keep ITC order (the candidates arrive ITC-sorted)
    order = np.argsort(-score, kind="stable")
    final_rank = np.empty(n, dtype=np.int64)
    final_rank[order] = np.arange(1, n + 1)

    def hit(i: int) -> SearchHit:
        it = items[i]
        return SearchHit(
            id=it.id,
            kind=it.kind,
            uri=public_uri(it.uri, base),
            caption=it.text,
            metadata=public_metadata(it.metadata, base),
            itc=float(itc[i]),
            itm_prob=None if np.isnan(prob[i]) else float(prob[i]),
            itm_logit=None if np.isnan(logit[i]) else float(logit[i]),
            score=float(score[i]),
            rank_itc=i + 1,
            rank=int(final_rank[i]),
            rerank_failed=bool(failed[i]),
        )

    hits: list[SearchHit] = []
    for i in order:
        if reranked and req.min_match is not None and not failed[i] and prob[i] < req.min_match:
            continue
        hits.append(hit(int(i)))
        if len(hits) >= req.k:
            break
    itc_hits = [hit(i) for i in range(min(req.k, n))] if req.include_itc else None
    return hits, itc_hits
