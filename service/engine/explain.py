"""Explain a reranked hit: where the cross-encoder looks for each word of a caption (grounding heatmaps).

The reranker's :meth:`~alignfuse.models.base.GroundingModel.grounding` (ALBEF: Grad-CAM of the ITM "match"
logit on a fusion layer's cross-attention, heads averaged, positive part, word pieces merged per word) runs
on the I/O pool under the engine's device lock, so it never computes at the same time as the device workers.
Rerankers without cross-attention from words to patches (ViLT) answer InvalidInputError (422).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from alignfuse.errors import InvalidInputError, NotFoundError, RequestTimeoutError
from alignfuse.models.base import Grounding, GroundingModel

from ..images import load_image_file, resolve_uri
from .collections import CollectionsMixin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainRequest:
    """Explain why ``text`` matches (or not) the image item ``item_id`` of ``collection``. ``layer``: the
    fusion layer whose cross-attention is explained (0 = the first; None = the reranker's default)."""

    collection: str
    item_id: int
    text: str
    layer: int | None = None


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class WordHeatmap(_Result):
    word: str = Field(description="A word of the caption (its word pieces merged).")
    tokens: list[str] = Field(description="The word pieces the tokenizer made of it.")
    heatmap: list[list[float]] = Field(
        description="Grad-CAM over the image's patch grid, rows top to bottom (non-negative; 0 = not looked at)."
    )
    max: float = Field(description="The heatmap's largest value.")
    peak: list[float] = Field(description="The peak cell's centre as fractions of the image [x, y].")


class ExplainResult(_Result):
    collection: str
    item_id: int
    text: str
    reranker: str = Field(description="The cross-encoder explained.")
    layer: int = Field(description="Fusion layer whose cross-attention is explained (0 = the first).")
    grid: list[int] = Field(description="[rows, cols] of every heatmap; they cover the whole image.")
    itm_logit: float = Field(description="ITM logit of 'match' for this pair (the explained score).")
    match_prob: float = Field(description="ITM match probability.")
    words: list[WordHeatmap]


def explain_result(req: ExplainRequest, reranker: str, g: Grounding) -> ExplainResult:
    words = []
    for w, word in enumerate(g.words):
        heat = np.asarray(g.heatmaps[w], dtype=np.float32)
        r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
        words.append(
            WordHeatmap(
                word=word,
                tokens=[t for t, o in zip(g.tokens, g.word_of_token, strict=True) if o == w],
                heatmap=[[float(v) for v in row] for row in heat],
                max=float(heat.max()) if heat.size else 0.0,
                peak=[(float(c) + 0.5) / heat.shape[1], (float(r) + 0.5) / heat.shape[0]],
            )
        )
    return ExplainResult(
        collection=req.collection,
        item_id=req.item_id,
        text=req.text,
        reranker=reranker,
        layer=g.layer,
        grid=list(g.grid),
        itm_logit=g.logit,
        match_prob=g.prob,
        words=words,
    )


class ExplainMixin(CollectionsMixin):
    def _explain_sync(self, req: ExplainRequest) -> ExplainResult:
        cross = self.cross
        if cross is None:
            raise InvalidInputError("explain needs a reranker (cross-encoder); the server has none loaded")
        if not isinstance(cross, GroundingModel):
            raise InvalidInputError(
                f"reranker {cross.info.spec} does not support grounding (family {cross.info.family}); "
                "ALBEF and BLIP rerankers do",
                detail={"reranker": cross.info.spec, "family": cross.info.family},
            )
        h, it = self._live_item(req.collection, req.item_id)
        if it.kind != "image":  # no such image item: 404, like an id that does not exist
            raise NotFoundError(
                f"item {req.item_id} of {req.collection!r} is a text; explain needs an image item",
                detail={"field": "item_id"},
            )
        lim = self.settings.limits
        img = load_image_file(
            resolve_uri(it.uri, h.coll.path), max_pixels=lim.max_pixels, max_bytes=lim.max_request_bytes
        )
        pixels = cross.image_transform(img).unsqueeze(0)
        with self._device_lock:
            try:
                g = cross.grounding(req.text, pixels, layer=req.layer)
            except (
                InvalidInputError
            ) as exc:  # a fusion layer this reranker does not have: 404, not a bad body
                if isinstance(exc.detail, dict) and exc.detail.get("field") == "layer":
                    raise NotFoundError(exc.message, detail=exc.detail) from None
                raise
        return explain_result(req, cross.info.spec, g)

    async def explain(self, req: ExplainRequest) -> ExplainResult:
        """Grounding heatmaps of ``req.text`` on an image item (see :class:`ExplainRequest`)."""
        self.require_ready()
        lim = self.settings.limits
        text = req.text.strip() if isinstance(req.text, str) else ""
        if not text or len(text) > lim.max_text_chars:
            raise InvalidInputError(
                f"text must have 1..{lim.max_text_chars} characters",
                detail={"field": "text", "min_length": 1, "max_length": lim.max_text_chars},
            )
        self._enter()
        try:
            return await asyncio.wait_for(self._io(self._explain_sync, req), lim.request_timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(
                f"explain ran past the request timeout of {lim.request_timeout_s} s",
                detail={"timeout_s": lim.request_timeout_s},
            ) from None
        finally:
            self._leave()
