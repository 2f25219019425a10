"""The search stages of one request, and how they hop between threads.

::

    event loop ─ plan (validate, resolve defaults) ─ admission
      [I/O pool, only for an image query or a collection due for a refresh check]
          open/refresh the collection + decode and transform the query image          (hop 1)
      dual worker ─ encode the query (micro-batched across requests)                  (hop 2)
      [I/O pool] FAISS top-C + item rows + rerank inputs (feature cache, LRU, files)   (hop 3)
      cross worker ─ ITM over the C pairs (micro-batched across requests)             (hop 4)
    event loop ─ fuse, sort, top-k

A text query on a collection opened recently goes straight to the dual worker (no hop 1). The ANN result
stays in numpy arrays from the index to the fused sort.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import OverloadedError, RequestTimeoutError
from alignfuse.models.base import DualEncoder

from ..batching import DeviceWorker
from ..images import open_image
from ..types import SearchRequest, SearchResponse, Timings
from .collections import CollectionsMixin
from .handles import Handle
from .kernels import RerankOut
from .plan import Candidates, SearchPlan, plan_search, rank
from .rerank_inputs import RerankInputsMixin


class SearchMixin(CollectionsMixin, RerankInputsMixin):
    def plan(self, req: SearchRequest, dual: DualEncoder | None = None) -> SearchPlan:
        """What ``req`` will do on this engine (InvalidInputError when it cannot run). ``dual``: the dual
        encoder of the collection searched (its logit scale checks the fusion), by default the default one."""
        return plan_search(
            req,
            self.settings.limits,
            has_reranker=self.cross is not None,
            reranker_fusion=None if self.cross is None else self.cross.info.default_fusion,
            itc_logit_scale=self._itc_logit_scale(dual),
        )

    def _planned_dual(self, name: str) -> DualEncoder | None:
        """The dual encoder of collection ``name`` when its handle is open (no I/O), else None (the default)."""
        h = self._handles.get(name)
        return None if h is None else self.duals.get(h.dual_spec)

    async def search(self, req: SearchRequest) -> SearchResponse:
        """Run one search (see :class:`~alignfuse.service.types.SearchRequest`). Raises domain errors only."""
        self.require_ready()
        plan = self.plan(req, self._planned_dual(req.collection))
        self._enter()
        timeout = self.settings.limits.request_timeout_s
        try:
            return await asyncio.wait_for(self._search(req, plan), timeout)
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise RequestTimeoutError(
                f"search ran past the request timeout of {timeout} s", detail={"timeout_s": timeout}
            ) from None
        except OverloadedError:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        finally:
            self._leave()

    def search_sync(self, req: SearchRequest) -> SearchResponse:
        """:meth:`search` from synchronous code (no running event loop in this thread)."""
        return asyncio.run(self.search(req))

    async def _search(self, req: SearchRequest, plan: SearchPlan) -> SearchResponse:
        # Each worker is told which requests will submit to it soon, so it holds a batch open only when a
        # task is actually on its way. ``claim`` hands the announcement to the submit that follows it
        # (``submit(..., expected=True)`` consumes it atomically with the enqueue); ``release`` withdraws
        # one that will not be submitted. The dual worker is the one of the collection's encoder: known at
        # once when its handle is open, else announced only once the collection is opened.
        workers: dict[str, DeviceWorker] = {}
        pending: set[str] = set()

        def announce(worker: str, w: DeviceWorker) -> None:
            workers[worker] = w
            pending.add(worker)
            w.expect()

        def announced(worker: str) -> DeviceWorker | None:
            return workers.get(worker) if worker in pending else None

        def claim(worker: str) -> None:
            pending.discard(worker)

        def release(worker: str) -> None:
            if worker in pending:
                pending.discard(worker)
                workers[worker].unexpect()

        h = self._handles.get(req.collection)
        if h is not None and h.dual_spec in self._dual_workers:
            announce("dual", self._dual_workers[h.dual_spec])
        if plan.rerank and self._cross_worker is not None:
            announce("cross", self._cross_worker)
        try:
            return await self._search_stages(req, plan, claim, release, announced)
        finally:
            for name in list(pending):
                release(name)

    def _open_image_query(
        self, name: str, h: Handle | None, image: bytes
    ) -> tuple[Handle, Image.Image, torch.Tensor]:
        """Hop 1 of an image query (I/O pool): the collection handle, the decoded query image and its
        pixels for the collection's dual encoder."""
        lim = self.settings.limits
        if h is None:
            h = self._handle(name)
        dual, _ = self.dual_for(h)
        img = open_image(image, max_bytes=lim.max_upload_bytes, max_pixels=lim.max_pixels, what="query image")
        return h, img, dual.image_transform(img).unsqueeze(0)

    def _candidates(
        self, h: Handle, vec: np.ndarray, plan: SearchPlan, text: str | None, query_img: Image.Image | None
    ) -> Candidates:
        """Hop 3 (I/O pool): the ANN top candidates joined with their items, and their rerank job."""
        coll = h.coll
        res = coll.search(vec[None, :].astype(np.float32, copy=False), plan.fetch, plan.target)
        ids, scores = res.ids[0], res.scores[0]
        live = ids >= 0  # -1 pads a result with fewer live items than asked
        ids, itc = ids[live], np.asarray(scores[live], dtype=np.float32)
        items = coll.get_many(ids) if len(ids) else []
        ann_done = time.perf_counter()
        n = len(items)
        job, order, failed = None, np.zeros(0, dtype=np.int64), np.zeros(n, dtype=bool)
        if plan.rerank and n:
            if plan.query == "text":
                assert text is not None
                job, order, failed = self._t2i_job(h, items, text)
            else:
                assert query_img is not None
                job, order, failed = self._i2t_job(items, query_img)
        return Candidates(res.version, items, itc, job, order, failed, ann_done)

    async def _search_stages(
        self,
        req: SearchRequest,
        plan: SearchPlan,
        claim: Callable[[str], None],
        release: Callable[[str], None],
        announced: Callable[[str], DeviceWorker | None],
    ) -> SearchResponse:
        t0 = time.perf_counter()
        h = self._cached_handle(req.collection)
        # 1. encode the query (micro-batched on the worker of the collection's dual encoder)
        query_img: Image.Image | None = None
        pixels: torch.Tensor | None = None
        if req.text is None:
            assert req.image is not None
            h, query_img, pixels = await self._io(self._open_image_query, req.collection, h, req.image)
        elif h is None:
            h = await self._io(self._handle, req.collection)
        assert h is not None
        dual, dual_worker = self.dual_for(h)
        if dual is not self.dual:
            plan = self.plan(req, dual)  # the fusion is checked against this encoder's logit scale
        # announced in :meth:`_search` when the collection was open already (the usual case)
        expected = announced("dual") is dual_worker
        claim("dual")
        if pixels is None:
            fut = dual_worker.submit("texts", [req.text], expected=expected)
        else:
            fut = dual_worker.submit("images", pixels, expected=expected)
        vec = (await dual_worker.wait(fut, "encode")).reshape(-1)
        t1 = time.perf_counter()
        # 2. candidates from the ANN index, their items and rerank inputs, in one hop
        cands = await self._io(self._candidates, h, vec, plan, req.text, query_img)
        t2 = cands.ann_done
        n = len(cands.items)
        logit = np.full(n, np.nan, dtype=np.float32)
        prob = np.full(n, np.nan, dtype=np.float32)
        pairs_scored = 0
        # 3. rerank the candidates with the cross-encoder (micro-batched on the cross worker)
        if plan.rerank and n:
            assert self._cross_worker is not None and self.cross is not None
            job = cands.job
            if job is not None:
                claim("cross")
                rfut = self._cross_worker.submit("rerank", job, cost=job.n_pairs, expected=True)
                out: RerankOut = await self._cross_worker.wait(rfut, "rerank")
                logit[cands.order] = out.logit
                prob[cands.order] = out.prob
                pairs_scored = job.n_pairs
                if out.new_tokens is not None:
                    self._remember_tokens(h, cands.items, cands.order, job, out.new_tokens)
            self.metrics.pairs_scored.inc(pairs_scored)
            if cands.failed.any():
                self.metrics.rerank_failed.inc(int(cands.failed.sum()))
        release("cross")
        t3 = time.perf_counter()
        hits, itc_hits = rank(req, plan, cands, logit, prob, self._itc_logit_scale(dual), h.coll.path)
        t4 = time.perf_counter()
        timings = Timings(
            encode=(t1 - t0) * 1e3, ann=(t2 - t1) * 1e3, rerank=(t3 - t2) * 1e3, total=(t4 - t0) * 1e3
        )
        for stage, v in (("encode", t1 - t0), ("ann", t2 - t1), ("rerank", t3 - t2), ("total", t4 - t0)):
            self.metrics.stage_latency.labels(stage).observe(v)
        return SearchResponse(
            collection=req.collection,
            version=cands.version,
            query=plan.query,
            target=plan.target,
            reranked=plan.rerank and n > 0,
            fusion=plan.fusion,
            hits=hits,
            timings=timings,
            pairs_scored=pairs_scored,
            candidates=n,
            itc_hits=itc_hits,
        )
