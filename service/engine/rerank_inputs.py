"""Rerank inputs: what the cross-encoder reads for each candidate.

Text→image: the candidates' image states come from the collection's feature cache, else the memory LRU of
recomputed tokens, else the stored image file (decoded and transformed here, its tokens computed on the
cross worker and remembered). Image→text: the query image's pixels and the candidates' texts.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import AlignfuseError, UnsupportedMediaError
from alignfuse.index.features import FeatureCache
from alignfuse.index.types import Item

from ..images import load_image_file, resolve_uri
from .caches import TokenKey
from .handles import Handle
from .kernels import RerankJob
from .lifecycle import EngineBase

log = logging.getLogger(__name__)


class RerankInputsMixin(EngineBase):
    def _token_key(self, h: Handle, it: Item) -> TokenKey:
        assert self.cross is not None
        return (f"{h.coll.path}|{self.cross.info.id}", it.id, it.sha256)

    def _feature_cache(self, h: Handle) -> FeatureCache | None:
        """The collection's feature cache when it was made by the loaded reranker, else None."""
        fc = h.coll.features
        if fc is None or self.cross is None or not self.cross.info.image_states_cacheable:
            return None
        return fc if fc.reranker.matches(self.cross.info) else None

    def _t2i_job(
        self, h: Handle, items: list[Item], text: str
    ) -> tuple[RerankJob | None, np.ndarray, np.ndarray]:
        """Image states of the candidates: feature cache → memory LRU → the stored file.

        Returns the job (None when no candidate could be read), the candidate positions in the job's image
        order (cached tokens first, then recomputed pixels), and which candidates failed (ITC fallback).
        """
        assert self.cross is not None
        lim = self.settings.limits
        n = len(items)
        failed = np.zeros(n, dtype=bool)
        cached_pos: list[int] = []
        cached: list[torch.Tensor] = []
        fc = self._feature_cache(h)
        todo = list(range(n))
        if fc is not None:
            have = fc.has([it.id for it in items])
            pos = [i for i in range(n) if have[i]]
            if pos:
                toks = fc.get([items[i].id for i in pos])
                cached_pos.extend(pos)
                cached.append(torch.from_numpy(np.ascontiguousarray(toks)))
                self.metrics.cache.labels("feature_cache").inc(len(pos))
            todo = [i for i in range(n) if not have[i]]
        rest: list[int] = []
        for i in todo:
            # single-stream rerankers (ViLT) have no image states apart from the pixels: nothing to remember
            t = (
                self._tokens.get(self._token_key(h, items[i]))
                if self.cross.info.image_states_cacheable
                else None
            )
            if t is not None:
                cached_pos.append(i)
                cached.append(t.unsqueeze(0))
            else:
                rest.append(i)
        if len(todo) > len(rest):
            self.metrics.cache.labels("memory").inc(len(todo) - len(rest))
        pix_pos: list[int] = []
        pixels: list[torch.Tensor] = []
        for i in rest:
            it = items[i]
            try:
                if it.kind != "image":
                    raise UnsupportedMediaError("not an image item")
                img = load_image_file(
                    resolve_uri(it.uri, h.coll.path),
                    max_pixels=lim.max_pixels,
                    max_bytes=lim.max_request_bytes,
                )
                pixels.append(self.cross.image_transform(img))
                pix_pos.append(i)
            except AlignfuseError as exc:
                log.warning("rerank: item %d (%s) falls back to ITC: %s", it.id, it.uri, exc.message)
                failed[i] = True
        if pixels:
            self.metrics.cache.labels("recomputed").inc(len(pixels))
        order = np.array(cached_pos + pix_pos, dtype=np.int64)
        if len(order) == 0:
            return None, order, failed
        job = RerankJob(
            texts=(text,),
            tokens=torch.cat(cached) if cached else None,
            pixels=torch.stack(pixels) if pixels else None,
        )
        return job, order, failed

    def _i2t_job(
        self, items: list[Item], img: Image.Image
    ) -> tuple[RerankJob | None, np.ndarray, np.ndarray]:
        """The candidates' texts against the query image (a candidate without text fails: ITC fallback)."""
        assert self.cross is not None
        n = len(items)
        failed = np.array([not (it.text and it.text.strip()) for it in items], dtype=bool)
        pos = [i for i in range(n) if not failed[i]]
        order = np.array(pos, dtype=np.int64)
        if not pos:
            return None, order, failed
        texts = tuple(str(items[i].text) for i in pos)
        pixels = self.cross.image_transform(img).unsqueeze(0)
        return RerankJob(texts=texts, tokens=None, pixels=pixels), order, failed

    def _remember_tokens(
        self, h: Handle, items: list[Item], order: np.ndarray, job: RerankJob, new_tokens: torch.Tensor
    ) -> None:
        """Keep the tokens the cross worker recomputed from the candidates' files (text→image only)."""
        if job.texts and len(job.texts) > 1:  # image→text: the query image is not an item
            return
        if self.cross is not None and not self.cross.info.image_states_cacheable:
            return
        n_cached = 0 if job.tokens is None else len(job.tokens)
        for j, i in enumerate(order[n_cached:]):
            self._tokens.put(self._token_key(h, items[int(i)]), new_tokens[j].clone())
