"""The search pipeline: models, collections, device workers, micro-batching, limits. No HTTP in here.

::

    query ─▶ encode (dual worker, micro-batched) ─▶ FAISS top-C ─▶ image states (feature cache, memory
          LRU, or the stored file) ─▶ ITM over C pairs (cross worker, micro-batched) ─▶ sort ─▶ top-k

Use :meth:`SearchEngine.load` (or ``await start()``) once, then ``await search(...)`` from any number of
concurrent tasks (or :meth:`search_sync` from plain code), and :meth:`close` at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import (
    AlignfuseError,
    InvalidInputError,
    ModelUnavailableError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    UnsupportedMediaError,
)
from alignfuse.index.collection import Collection, is_collection
from alignfuse.index.manifest import Manifest
from alignfuse.index.sources import text_sha256
from alignfuse.index.types import Item, NewItem, SearchResult
from alignfuse.models.base import CrossEncoder, DualEncoder, default_fusion_for, fuse_scores
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

from .batching import BatchConfig, DeviceWorker
from .handlers import BULK_CHUNK, CrossHandlers, DualHandlers, RerankJob, RerankOut, TokenLRU
from .images import FORMATS, image_format, load_image_file, open_image, resolve_uri, thumbnail_jpeg
from .metrics import Metrics
from .settings import Settings
from .types import (
    FUSIONS,
    AddResult,
    CollectionInfo,
    DeleteResult,
    ImageUpload,
    ItemInfo,
    Modality,
    ModelsInfo,
    SearchHit,
    SearchRequest,
    SearchResponse,
    TextUpload,
    Timings,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UPLOADS_DIR = "uploads"


def check_item_id(name: str, item_id: int) -> int:
    """Item ids are int64 >= 0; anything else cannot exist."""
    if not isinstance(item_id, int) or not 0 <= item_id < 2**63:
        raise NotFoundError(f"no item {item_id} in {name!r}", detail={"id": str(item_id)})
    return item_id


def check_collection_name(name: str) -> str:
    """Collection names are plain folder names (no separators, no leading dot): never a path."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise NotFoundError(f"no collection named {name!r}", detail={"collection": name})
    return name


class _Handle:
    """An open collection plus when it last checked for a newer committed version."""

    def __init__(self, coll: Collection) -> None:
        self.coll = coll
        self.checked = time.monotonic()
        self.refresh_lock = threading.Lock()
        self.write_lock = asyncio.Lock()


# --------------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------------
class SearchEngine:
    """Owns the models, the open collections, one device worker per model and the concurrency limit."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        dual_encoder: DualEncoder | None = None,
        cross_encoder: CrossEncoder | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.root = Path(settings.collections).expanduser()
        self.dual: DualEncoder | None = dual_encoder
        self.cross: CrossEncoder | None = cross_encoder
        self._dual_worker: DeviceWorker | None = None
        self._cross_worker: DeviceWorker | None = None
        self._handles: dict[str, _Handle] = {}
        self._handles_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="alignfuse-io")
        self._tokens = TokenLRU(settings.models.rerank_memory_cache_mb * 1024 * 1024)
        self._thumbs: OrderedDict[tuple[str, int, str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._inflight = 0
        self._device_lock = threading.Lock()  # both models sit on settings.models.device
        self._inflight_lock = threading.Lock()
        self._ready = threading.Event()
        self.load_error: AlignfuseError | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _manifests(self) -> list[tuple[str, Manifest]]:
        out: list[tuple[str, Manifest]] = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and is_collection(p) and _NAME_RE.match(p.name):
                try:
                    out.append((p.name, Manifest.load(p / "manifest.json")))
                except (AlignfuseError, OSError) as exc:
                    log.warning("skipping collection %s: %s", p.name, exc)
        return out

    def model_specs(self) -> tuple[str, str | None]:
        """(dual-encoder spec, reranker spec or None): from the settings, else from the collections'
        manifests (the dual encoder most collections were built with). InvalidInputError when neither."""
        ms = self.settings.models
        manifests = self._manifests() if ms.dual_encoder is None or ms.reranker is None else []
        dual = ms.dual_encoder
        if dual is None:
            counts = Counter(m.encoder.spec for _, m in manifests)
            if not counts:
                raise InvalidInputError(
                    f"no dual encoder configured and no collection under {self.root} names one; "
                    "set --model / ALIGNFUSE_MODELS__DUAL_ENCODER"
                )
            # the dual encoder most collections were built with (ties: alphabetical)
            dual = min(counts, key=lambda spec: (-counts[spec], spec))
            if len(counts) > 1:
                log.warning("collections use several dual encoders %s; serving with %s", dict(counts), dual)
        reranker: str | None = ms.reranker
        if reranker is None:
            rr = Counter(
                m.reranker.spec for _, m in manifests if m.reranker is not None and m.encoder.spec == dual
            )
            reranker = min(rr, key=lambda spec: (-rr[spec], spec)) if rr else None
        elif reranker.strip().lower() in ("none", "off", ""):
            reranker = None
        return dual, reranker

    def load(self) -> None:
        """Load (unless injected) and warm the models, start the device workers. Idempotent."""
        if self.ready:
            return
        try:
            ms = self.settings.models
            if self.dual is None:
                dual_spec, rr_spec = self.model_specs()
                log.info("loading dual encoder %s on %s (%s)", dual_spec, ms.device, ms.precision)
                self.dual = create_dual_encoder(dual_spec, ms.device, ms.precision)
                if rr_spec is not None:
                    log.info("loading reranker %s", rr_spec)
                    self.cross = create_cross_encoder(rr_spec, ms.device, ms.precision)
            self._start_workers()
            if ms.warmup:
                self._warmup()
        except AlignfuseError as exc:
            self.load_error = exc
            log.error("engine failed to load: %s", exc.message)
            raise
        except Exception as exc:
            self.load_error = ModelUnavailableError(f"{type(exc).__name__}: {exc}")
            log.exception("engine failed to load")
            raise self.load_error from exc
        self._ready.set()
        self.metrics.ready.set(1)
        log.info("engine ready: %s", self.models_info())

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.load)

    def _start_workers(self) -> None:
        b = self.settings.batching
        assert self.dual is not None
        cfg = BatchConfig(
            max_batch=b.max_batch,
            max_wait_s=b.max_wait_ms / 1000.0 if b.max_batch > 1 else 0.0,
            queue_size=b.queue_size,
            max_cost={"texts": max(b.max_batch, 1), "images": max(b.max_batch, 1)},
        )
        dh = DualHandlers(self.dual)
        self._dual_worker = DeviceWorker(
            "dual",
            {"texts": dh.texts, "images": dh.images},
            cfg,
            on_batch=self.metrics.on_batch,
            announced=True,
            device_lock=self._device_lock,
        )
        self._dual_worker.start()
        self.metrics.track_queue("dual", lambda: float(self._dual_worker.depth if self._dual_worker else 0))
        if self.cross is not None:
            ch = CrossHandlers(self.cross, b.max_pairs)
            ccfg = replace(cfg, max_cost={"rerank": b.max_pairs, "tokens": BULK_CHUNK})
            self._cross_worker = DeviceWorker(
                "cross",
                {"rerank": ch.rerank, "tokens": ch.tokens},
                ccfg,
                on_batch=self.metrics.on_batch,
                announced=True,
                device_lock=self._device_lock,
            )
            self._cross_worker.start()
            self.metrics.track_queue(
                "cross", lambda: float(self._cross_worker.depth if self._cross_worker else 0)
            )

    def _warmup(self) -> None:
        assert self.dual is not None and self._dual_worker is not None
        timeout = max(60.0, self.settings.limits.request_timeout_s)
        self._dual_worker.run_sync("texts", ["warm up"], timeout=timeout)
        blank = Image.new("RGB", (32, 32), (127, 127, 127))
        self._dual_worker.run_sync("images", self.dual.image_transform(blank).unsqueeze(0), timeout=timeout)
        if self.cross is not None and self._cross_worker is not None:
            px = self.cross.image_transform(blank).unsqueeze(0)
            self._cross_worker.run_sync("rerank", RerankJob(("warm up",), None, px), cost=1, timeout=timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        self.metrics.ready.set(0)
        for w in (self._dual_worker, self._cross_worker):
            if w is not None:
                w.stop()
        with self._handles_lock:
            for h in self._handles.values():
                try:
                    h.coll.close()
                except Exception:  # pragma: no cover - closing must not raise
                    log.exception("closing collection failed")
            self._handles.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def require_ready(self) -> None:
        if self._closed:
            raise NotReadyError("the engine is shut down")
        if self.load_error is not None:
            raise NotReadyError(f"models failed to load: {self.load_error.message}")
        if not self.ready:
            raise NotReadyError("models are still loading; retry shortly")

    def models_info(self) -> ModelsInfo:
        if self.dual is None:
            raise NotReadyError("models are still loading")
        return ModelsInfo(
            dual_encoder=self.dual.info.spec,
            dual_encoder_id=self.dual.info.id,
            reranker=None if self.cross is None else self.cross.info.spec,
            reranker_id=None if self.cross is None else self.cross.info.id,
            device=self.settings.models.device,
            precision=self.settings.models.precision,
            default_fusion=None if self.cross is None else self.cross.info.default_fusion,
        )

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    # -- collections ---------------------------------------------------------------------------------
    def _handle(self, name: str) -> _Handle:
        check_collection_name(name)
        self.require_ready()
        assert self.dual is not None
        with self._handles_lock:
            h = self._handles.get(name)
        if h is not None:
            self._maybe_refresh(h)
            return h
        path = self.root / name
        if not is_collection(path):
            raise NotFoundError(f"no collection named {name!r}", detail={"collection": name})
        coll = Collection.open(path, encoder=self.dual.info)
        with self._handles_lock:
            h = self._handles.get(name)
            if h is None:
                h = self._handles[name] = _Handle(coll)
            else:
                coll.close()
        return h

    def _cached_handle(self, name: str) -> _Handle | None:
        """The open handle when no refresh check is due (no I/O: safe on the event loop), else None."""
        h = self._handles.get(name)
        if h is None or self._closed:
            return None
        if time.monotonic() - h.checked >= self.settings.refresh_interval_s:
            return None
        self.require_ready()
        return h

    def _maybe_refresh(self, h: _Handle, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - h.checked < self.settings.refresh_interval_s:
            return
        if not h.refresh_lock.acquire(blocking=force):
            return  # another thread is refreshing; serve the committed version we have
        try:
            h.checked = now
            if h.coll.refresh():
                log.info("collection %s now at version %d", h.coll.path.name, h.coll.version)
        finally:
            h.refresh_lock.release()

    def _info(self, name: str, manifest: Manifest, compatible: bool, error: str | None) -> CollectionInfo:
        return CollectionInfo(
            name=name,
            version=manifest.version,
            images=manifest.count("image"),
            texts=manifest.count("text"),
            dim=manifest.dim,
            dual_encoder=manifest.encoder.spec,
            reranker=None if manifest.reranker is None else manifest.reranker.spec,
            index_key=manifest.index_key,
            feature_cache=manifest.features is not None,
            compatible=compatible,
            error=error,
        )

    def list_collections(self) -> list[CollectionInfo]:
        self.require_ready()
        out = []
        for name, _m in self._manifests():
            try:
                out.append(self.collection_info(name))
            except AlignfuseError as exc:
                out.append(self._info(name, _m, False, exc.message))
        return out

    def collection_info(self, name: str) -> CollectionInfo:
        h = self._handle(name)
        return self._info(name, h.coll.manifest, True, None)

    def _item_info(self, it: Item) -> ItemInfo:
        return ItemInfo(
            id=it.id,
            kind=it.kind,
            uri=it.uri,
            caption=it.text,
            metadata=dict(it.metadata),
            state=it.state,
            version_added=it.version_added,
        )

    def get_item(self, name: str, item_id: int) -> ItemInfo:
        check_item_id(name, item_id)
        h = self._handle(name)
        it = h.coll.get(int(item_id))
        if it.state != "live":
            raise NotFoundError(f"item {item_id} of {name!r} was deleted", detail={"id": item_id})
        return self._item_info(it)

    def list_items(
        self, name: str, *, kind: Modality | None = None, offset: int = 0, limit: int = 100
    ) -> list[ItemInfo]:
        h = self._handle(name)
        return [self._item_info(it) for it in h.coll.list(kind=kind, offset=offset, limit=limit)]

    def thumbnail(self, name: str, item_id: int, size: int | None = None) -> bytes:
        """A JPEG of an image item's own stored file (its recorded uri), at most ``size`` px per side."""
        lim = self.settings.limits
        size = lim.thumbnail_size if size is None else size
        if not 16 <= size <= 1024:
            raise InvalidInputError("size must be in [16, 1024]", detail={"min": 16, "max": 1024})
        check_item_id(name, item_id)
        h = self._handle(name)
        it = h.coll.get(int(item_id))
        if it.state != "live":
            raise NotFoundError(f"item {item_id} of {name!r} was deleted", detail={"id": item_id})
        if it.kind != "image":
            raise NotFoundError(
                f"item {item_id} of {name!r} is a text; it has no thumbnail", detail={"id": item_id}
            )
        key = (str(h.coll.path), it.id, it.sha256, size)
        with self._thumbs_lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        path = resolve_uri(it.uri, h.coll.path)
        img = load_image_file(path, max_pixels=lim.max_pixels, max_bytes=lim.max_request_bytes)
        data = thumbnail_jpeg(img, size)
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return data

    # -- search --------------------------------------------------------------------------------------
    def _validate(self, req: SearchRequest) -> tuple[Modality, Modality, int, bool]:
        lim = self.settings.limits
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
        if req.fusion is not None and req.fusion not in FUSIONS:
            raise InvalidInputError(
                f"fusion must be one of {FUSIONS}", detail={"field": "fusion", "allowed": FUSIONS}
            )
        if req.fusion == "itm+itc_logit" and self._itc_logit_scale() is None:
            raise InvalidInputError(
                "fusion itm+itc_logit needs a dual encoder with a learned logit scale; the dual encoder "
                "has none",
                detail={"field": "fusion", "allowed": ["itm", "itm+itc"]},
            )
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
        if req.rerank and self.cross is None:
            raise InvalidInputError(
                "no reranker (cross-encoder) is loaded on this server", detail={"field": "rerank"}
            )
        rerank = cross_modal and self.cross is not None and req.rerank is not False
        return query, target, max(cand, req.k), rerank

    def _itc_logit_scale(self) -> float | None:
        return None if self.dual is None else self.dual.info.itc_logit_scale

    def _enter(self) -> None:
        with self._inflight_lock:
            if self._inflight >= self.settings.batching.max_concurrent_requests:
                self.metrics.rejected.labels("concurrency").inc()
                raise OverloadedError(
                    f"too many concurrent searches ({self._inflight})",
                    retry_after=self._dual_worker.retry_after() if self._dual_worker else 1.0,
                )
            self._inflight += 1
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
        self.metrics.in_flight.dec()

    async def search(self, req: SearchRequest) -> SearchResponse:
        """Run one search (see :class:`~alignfuse.service.types.SearchRequest`). Raises domain errors only."""
        self.require_ready()
        plan = self._validate(req)
        if req.fusion is None:
            default = self.cross.info.default_fusion if self.cross is not None else "itm"
            fusion = default_fusion_for(default, self._itc_logit_scale())
            req = replace(req, fusion=fusion)  # type: ignore[arg-type]
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

    async def _search(self, req: SearchRequest, plan: tuple[Modality, Modality, int, bool]) -> SearchResponse:
        # Each worker is told which requests will submit to it soon, so it holds a batch open only when a
        # task is actually on its way. ``claim`` hands the announcement to the submit that follows it
        # (``submit(..., expected=True)`` consumes it atomically with the enqueue); ``release`` withdraws
        # one that will not be submitted.
        assert self._dual_worker is not None
        workers = {"dual": self._dual_worker}
        if plan[3] and self._cross_worker is not None:
            workers["cross"] = self._cross_worker
        pending = set(workers)
        for w in workers.values():
            w.expect()

        def claim(worker: str) -> None:
            pending.discard(worker)

        def release(worker: str) -> None:
            if worker in pending:
                pending.discard(worker)
                workers[worker].unexpect()

        try:
            return await self._search_stages(req, plan, claim, release)
        finally:
            for name in list(pending):
                release(name)

    async def _search_stages(
        self,
        req: SearchRequest,
        plan: tuple[Modality, Modality, int, bool],
        claim: Callable[[str], None],
        release: Callable[[str], None],
    ) -> SearchResponse:
        t0 = time.perf_counter()
        query, target, n_cand, rerank = plan
        assert self._dual_worker is not None and self.dual is not None
        cached = self._cached_handle(req.collection)
        h = cached if cached is not None else await self._io(self._handle, req.collection)
        coll = h.coll
        # 1. encode the query (micro-batched on the dual worker)
        query_img: Image.Image | None = None
        if req.text is not None:
            claim("dual")
            fut = self._dual_worker.submit("texts", [req.text], expected=True)
        else:
            assert req.image is not None
            lim = self.settings.limits
            query_img = await self._io(
                open_image,
                req.image,
                max_bytes=lim.max_upload_bytes,
                max_pixels=lim.max_pixels,
                what="query image",
            )
            pixels = await self._io(lambda: self.dual.image_transform(query_img).unsqueeze(0))  # type: ignore[union-attr]
            claim("dual")
            fut = self._dual_worker.submit("images", pixels, expected=True)
        vec = (await self._dual_worker.wait(fut, "encode")).reshape(-1)
        t1 = time.perf_counter()
        # 2. candidates from the ANN index, joined with their items
        fetch = n_cand if rerank else req.k

        def ann() -> tuple[SearchResult, list[tuple[int, float]], list[Item]]:
            res = coll.search(vec[None, :].astype(np.float32), fetch, target)
            row = res.row(0)
            return res, row, coll.get_many([i for i, _ in row]) if row else []

        result, pairs, items = await self._io(ann)
        t2 = time.perf_counter()
        itc = np.array([s for _, s in pairs], dtype=np.float32)
        n = len(pairs)
        logit = np.full(n, np.nan, dtype=np.float32)
        prob = np.full(n, np.nan, dtype=np.float32)
        failed = np.zeros(n, dtype=bool)
        pairs_scored = 0
        # 3. rerank the candidates with the cross-encoder (micro-batched on the cross worker)
        if rerank and n:
            assert self._cross_worker is not None and self.cross is not None
            if query == "text":
                assert req.text is not None
                job, order, failed = await self._io(self._t2i_job, h, items, req.text)
            else:
                assert query_img is not None
                job, order, failed = await self._io(self._i2t_job, items, query_img)
            if job is not None:
                claim("cross")
                rfut = self._cross_worker.submit("rerank", job, cost=job.n_pairs, expected=True)
                out: RerankOut = await self._cross_worker.wait(rfut, "rerank")
                logit[order] = out.logit
                prob[order] = out.prob
                pairs_scored = job.n_pairs
                if out.new_tokens is not None:
                    self._remember_tokens(h, items, order, job, out.new_tokens)
            self.metrics.pairs_scored.inc(pairs_scored)
            if failed.any():
                self.metrics.rerank_failed.inc(int(failed.sum()))
        release("cross")
        t3 = time.perf_counter()
        hits, itc_hits = self._rank(req, items, itc, logit, prob, failed, reranked=rerank and n > 0)
        t4 = time.perf_counter()
        timings = Timings(
            encode=(t1 - t0) * 1e3, ann=(t2 - t1) * 1e3, rerank=(t3 - t2) * 1e3, total=(t4 - t0) * 1e3
        )
        for stage, v in (("encode", t1 - t0), ("ann", t2 - t1), ("rerank", t3 - t2), ("total", t4 - t0)):
            self.metrics.stage_latency.labels(stage).observe(v)
        return SearchResponse(
            collection=req.collection,
            version=result.version,
            query=query,
            target=target,
            reranked=rerank and n > 0,
            fusion=req.fusion or "itm",
            hits=hits,
            timings=timings,
            pairs_scored=pairs_scored,
            candidates=n,
            itc_hits=itc_hits,
        )

    def _rank(
        self,
        req: SearchRequest,
        items: list[Item],
        itc: np.ndarray,
        logit: np.ndarray,
        prob: np.ndarray,
        failed: np.ndarray,
        *,
        reranked: bool,
    ) -> tuple[list[SearchHit], list[SearchHit] | None]:
        n = len(items)
        if reranked:
            # a candidate whose image could not be read falls back to its ITC score
            fused = fuse_scores(logit, itc, req.fusion or "itm", self._itc_logit_scale())
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
                uri=it.uri,
                caption=it.text,
                metadata=dict(it.metadata),
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

    # -- rerank inputs -------------------------------------------------------------------------------
    def _token_key(self, h: _Handle, it: Item) -> tuple[str, int, str]:
        assert self.cross is not None
        return (f"{h.coll.path}|{self.cross.info.id}", it.id, it.sha256)

    def _feature_cache(self, h: _Handle) -> Any:
        fc = h.coll.features
        if fc is None or self.cross is None:
            return None
        return fc if fc.reranker.matches(self.cross.info) else None

    def _t2i_job(
        self, h: _Handle, items: list[Item], text: str
    ) -> tuple[RerankJob | None, np.ndarray, np.ndarray]:
        """Image states of the candidates: feature cache → memory LRU → the stored file."""
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
            t = self._tokens.get(self._token_key(h, items[i]))
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
        self, h: _Handle, items: list[Item], order: np.ndarray, job: RerankJob, new_tokens: torch.Tensor
    ) -> None:
        if job.texts and len(job.texts) > 1:  # image→text: the query image is not an item
            return
        n_cached = 0 if job.tokens is None else len(job.tokens)
        for j, i in enumerate(order[n_cached:]):
            self._tokens.put(self._token_key(h, items[int(i)]), new_tokens[j].clone())

    # -- writes --------------------------------------------------------------------------------------
    async def add_images(self, name: str, uploads: Sequence[ImageUpload]) -> AddResult:
        """Decode, store, encode and commit images atomically (one new version, or nothing)."""
        self.require_ready()
        lim = self.settings.limits
        if not uploads:
            raise InvalidInputError("no images given", detail={"min_items": 1})
        if len(uploads) > lim.max_files_per_upload:
            raise InvalidInputError(
                f"{len(uploads)} images in one request; at most {lim.max_files_per_upload}",
                detail={"max_items": lim.max_files_per_upload},
            )
        for u in uploads:
            if u.caption is not None and len(u.caption) > lim.max_text_chars:
                raise InvalidInputError(
                    f"caption over {lim.max_text_chars} characters", detail={"max_length": lim.max_text_chars}
                )
        h = await self._io(self._handle, name)
        assert self.dual is not None and self._dual_worker is not None

        def prepare() -> tuple[list[Image.Image], list[str], list[str]]:
            imgs, shas, fmts = [], [], []
            for i, u in enumerate(uploads):
                img = open_image(
                    u.data, max_bytes=lim.max_upload_bytes, max_pixels=lim.max_pixels, what=f"image {i + 1}"
                )
                fmts.append(str(image_format(u.data)))
                imgs.append(img)
                shas.append(hashlib.sha256(u.data).hexdigest())
            return imgs, shas, fmts

        imgs, shas, fmts = await self._io(prepare)
        pixels = await self._io(lambda: torch.stack([self.dual.image_transform(im) for im in imgs]))  # type: ignore[union-attr]
        timeout = self.settings.limits.request_timeout_s
        vecs = await self._dual_worker.run("images", pixels, cost=len(imgs), timeout=timeout)
        tokens: np.ndarray | None = None
        fc = self._feature_cache(h) if h.coll.manifest.features is not None else None
        if fc is not None and self._cross_worker is not None and self.cross is not None:
            cpx = await self._io(lambda: torch.stack([self.cross.image_transform(im) for im in imgs]))  # type: ignore[union-attr]
            tokens = await self._cross_worker.run("tokens", cpx, cost=len(imgs), timeout=timeout)

        def write() -> AddResult:
            up_dir = h.coll.path / UPLOADS_DIR
            new_items: list[NewItem] = []
            for u, sha, fmt in zip(uploads, shas, fmts, strict=True):
                dest = up_dir / sha[:2] / f"{sha}{FORMATS.get(fmt, '.img')}"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(dest.suffix + ".tmp")
                    tmp.write_bytes(u.data)
                    tmp.replace(dest)
                meta = dict(u.metadata)
                if u.filename:
                    meta.setdefault("filename", Path(u.filename).name)
                new_items.append(
                    NewItem(kind="image", uri=str(dest.resolve()), sha256=sha, text=u.caption, metadata=meta)
                )
            return self._commit(h, new_items, vecs, tokens)

        return await self._write(h, write)

    async def add_texts(self, name: str, texts: Sequence[TextUpload]) -> AddResult:
        """Encode and commit texts atomically."""
        self.require_ready()
        lim = self.settings.limits
        if not texts:
            raise InvalidInputError("no texts given", detail={"min_items": 1})
        if len(texts) > lim.max_texts_per_upload:
            raise InvalidInputError(
                f"{len(texts)} texts in one request; at most {lim.max_texts_per_upload}",
                detail={"max_items": lim.max_texts_per_upload},
            )
        for i, t in enumerate(texts):
            if not t.text.strip() or len(t.text) > lim.max_text_chars:
                raise InvalidInputError(
                    f"text {i + 1} is empty or over {lim.max_text_chars} characters",
                    detail={"index": i, "min_length": 1, "max_length": lim.max_text_chars},
                )
        h = await self._io(self._handle, name)
        assert self._dual_worker is not None
        vecs = await self._dual_worker.run(
            "texts", [t.text for t in texts], cost=len(texts), timeout=lim.request_timeout_s
        )
        new_items = [
            NewItem(
                kind="text",
                uri=f"text:{text_sha256(t.text)[:16]}",
                sha256=text_sha256(t.text),
                text=t.text,
                metadata=dict(t.metadata),
            )
            for t in texts
        ]
        return await self._write(h, lambda: self._commit(h, new_items, vecs, None))

    def _commit(
        self, h: _Handle, items: list[NewItem], vecs: np.ndarray, tokens: np.ndarray | None
    ) -> AddResult:
        """Stage new items (skipping content already live) and commit once; all or nothing."""
        coll = h.coll
        ids: list[int] = [-1] * len(items)
        with coll.writer() as w:
            known = w.known_sha256([it.sha256 for it in items])
            fresh: list[int] = []
            seen: dict[str, int] = {}
            for i, it in enumerate(items):
                if it.sha256 in known or it.sha256 in seen:
                    continue
                seen[it.sha256] = i
                fresh.append(i)
            if fresh:
                new_ids = w.add(
                    [items[i] for i in fresh], np.ascontiguousarray(vecs[fresh], dtype=np.float32)
                )
                for i, nid in zip(fresh, new_ids.tolist(), strict=True):
                    ids[i] = int(nid)
                if tokens is not None and self.cross is not None:
                    w.put_features(new_ids, tokens[fresh], self.cross.info)
            version = w.commit()
        self._maybe_refresh(h, force=True)
        for i, it in enumerate(items):
            if ids[i] < 0:
                src = seen.get(it.sha256)
                if src is not None and ids[src] >= 0:
                    ids[i] = ids[src]
                else:
                    existing = h.coll.find_by_sha256(it.sha256, it.kind)
                    ids[i] = -1 if existing is None else existing.id
        return AddResult(
            collection=coll.path.name,
            version=version,
            ids=ids,
            added=len(fresh),
            duplicates=len(items) - len(fresh),
        )

    async def delete_item(self, name: str, item_id: int) -> DeleteResult:
        self.require_ready()
        check_item_id(name, item_id)
        h = await self._io(self._handle, name)

        def run() -> DeleteResult:
            it = h.coll.get(int(item_id))  # NotFoundError for an unknown id
            if it.state != "live":
                raise NotFoundError(f"item {item_id} of {name!r} was already deleted", detail={"id": item_id})
            with h.coll.writer() as w:
                w.delete([int(item_id)])
                version = w.commit()
            self._maybe_refresh(h, force=True)
            return DeleteResult(collection=name, version=version, id=int(item_id))

        return await self._write(h, run)

    async def _write(self, h: _Handle, fn: Callable[[], T]) -> T:
        """One write at a time per collection in this process; another process's lock is a ConflictError."""
        async with h.write_lock:
            return await self._io(fn)
