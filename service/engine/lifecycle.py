"""The engine's state and lifecycle: models, device workers, the I/O pool, admission (concurrency limit).

:class:`EngineBase` holds everything the other parts of the engine share; the parts (open collections,
rerank inputs, the search stages, ingestion) are mixins over it, combined by
:class:`~alignfuse.service.engine.SearchEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from alignfuse.errors import (
    AlignfuseError,
    EncoderMismatchError,
    InvalidInputError,
    ModelUnavailableError,
    NotReadyError,
    OverloadedError,
)
from alignfuse.index.manifest import Manifest
from alignfuse.models.base import CrossEncoder, DualEncoder
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder
from alignfuse.models.runtime import precision_label, runtime_label

from ..batching import BatchConfig, BatchEvent, DeviceWorker
from ..metrics import Metrics
from ..settings import Settings
from ..types import ModelsInfo
from .admission import Admission, AdmissionConfig, trim_memory
from .caches import ThumbnailLRU, TokenLRU
from .handles import Handle, scan_manifests
from .kernels import BULK_CHUNK, CrossKernels, DualKernels, RerankJob

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineBase:
    """Owns the models, one device worker per model, the I/O thread pool and the concurrency limit.

    Dual encoders: one per distinct encoder the collections were built with, keyed by spec (``duals``);
    ``dual`` is the default one (the configured or most common), which ``/readyz`` reports first. The
    reranker is one model for every collection."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        dual_encoder: DualEncoder | None = None,
        cross_encoder: CrossEncoder | None = None,
        dual_encoders: Sequence[DualEncoder] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.root = Path(settings.collections).expanduser()
        self.dual: DualEncoder | None = dual_encoder
        self.cross: CrossEncoder | None = cross_encoder
        # further dual encoders given here serve the collections they built (tests, notebooks)
        self._extra_duals: tuple[DualEncoder, ...] = tuple(dual_encoders)
        if dual_encoder is None and self._extra_duals:
            raise InvalidInputError("dual_encoders needs dual_encoder (the default one) too")
        self.duals: dict[str, DualEncoder] = {}
        self._dual_workers: dict[str, DeviceWorker] = {}
        self._dual_errors: dict[str, AlignfuseError] = {}  # spec → why it could not be loaded
        self._dual_worker: DeviceWorker | None = None
        self._cross_worker: DeviceWorker | None = None
        self._handles: dict[str, Handle] = {}
        self._handles_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="alignfuse-io")
        self._tokens = TokenLRU(settings.models.rerank_memory_cache_mb * 1024 * 1024)
        self._thumbs = ThumbnailLRU()
        b = settings.batching
        self.admission = Admission(
            AdmissionConfig(
                max_queue_wait_s=b.max_queue_wait_ms / 1000.0, max_in_flight=b.max_concurrent_requests
            )
        )
        self._device_lock = threading.Lock()  # every model sits on settings.models.device
        self._ready = threading.Event()
        self.load_error: AlignfuseError | None = None
        self._closed = False
        self._injected = dual_encoder is not None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _manifests(self) -> list[tuple[str, Manifest]]:
        return scan_manifests(self.root)

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

    def _create_dual(self, spec: str) -> DualEncoder:
        ms = self.settings.models
        log.info("loading dual encoder %s on %s (%s)", spec, ms.device, ms.precision)
        return create_dual_encoder(spec, ms.device, ms.precision, ms.runtime, ms.graph_cache_dir)

    def _create_cross(self, spec: str) -> CrossEncoder:
        ms = self.settings.models
        log.info("loading reranker %s", spec)
        return create_cross_encoder(spec, ms.device, ms.precision, ms.runtime, ms.graph_cache_dir)

    def collection_encoders(self) -> list[str]:
        """The distinct dual-encoder specs the collections under the root were built with (sorted)."""
        return sorted({m.encoder.spec for _, m in self._manifests()})

    def _load_duals(self) -> None:
        """``duals``: the default dual encoder plus one per other encoder a collection names (bounded by the
        collections present at start). One that fails to load is recorded: searching its collections is a
        409 naming why, the rest are served."""
        assert self.dual is not None
        self.duals = {self.dual.info.spec: self.dual}
        if self._injected:  # models given to the constructor are used as they are
            for d in self._extra_duals:
                self.duals.setdefault(d.info.spec, d)
            return
        for spec in self.collection_encoders():
            if spec in self.duals:
                continue
            try:
                self.duals[spec] = self._create_dual(spec)
            except AlignfuseError as exc:
                self._dual_errors[spec] = exc
                log.warning("dual encoder %s of some collections could not be loaded: %s", spec, exc.message)
            except Exception as exc:
                self._dual_errors[spec] = ModelUnavailableError(f"{type(exc).__name__}: {exc}")
                log.exception("dual encoder %s could not be loaded", spec)

    def load(self) -> None:
        """Load (unless injected) and warm the models, start the device workers. Idempotent."""
        if self.ready:
            return
        try:
            if self.dual is None:
                dual_spec, rr_spec = self.model_specs()
                self.dual = self._create_dual(dual_spec)
                if rr_spec is not None:
                    self.cross = self._create_cross(rr_spec)
            self._load_duals()
            self._start_workers()
            if self.settings.models.warmup:
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
        # one worker per dual encoder: "dual" for the default one, "dual-2", "dual-3", ... for the others
        for i, (spec, dual) in enumerate(self.duals.items()):
            name = "dual" if i == 0 else f"dual-{i + 1}"
            dk = DualKernels(dual)
            worker = DeviceWorker(
                name,
                {"texts": dk.texts, "images": dk.images},
                cfg,
                on_batch=self._on_batch,
                announced=True,
                device_lock=self._device_lock,
            )
            worker.start()
            self._dual_workers[spec] = worker
            self.metrics.track_queue(name, partial(_depth, worker))
        self._dual_worker = self._dual_workers[self.dual.info.spec]
        if self.cross is not None:
            ck = CrossKernels(self.cross, b.max_pairs)
            ccfg = replace(cfg, max_cost={"rerank": b.max_pairs, "tokens": BULK_CHUNK})
            self._cross_worker = DeviceWorker(
                "cross",
                {"rerank": ck.rerank, "tokens": ck.tokens},
                ccfg,
                on_batch=self._on_batch,
                announced=True,
                device_lock=self._device_lock,
            )
            self._cross_worker.start()
            self.metrics.track_queue(
                "cross", lambda: float(self._cross_worker.depth if self._cross_worker else 0)
            )

    def _warmup(self) -> None:
        timeout = max(60.0, self.settings.limits.request_timeout_s)
        blank = Image.new("RGB", (32, 32), (127, 127, 127))
        for spec, dual in self.duals.items():
            worker = self._dual_workers[spec]
            worker.run_sync("texts", ["warm up"], timeout=timeout)
            worker.run_sync("images", dual.image_transform(blank).unsqueeze(0), timeout=timeout)
        if self.cross is not None and self._cross_worker is not None:
            px = self.cross.image_transform(blank).unsqueeze(0)
            self._cross_worker.run_sync("rerank", RerankJob(("warm up",), None, px), cost=1, timeout=timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        self.metrics.ready.set(0)
        for w in (*self._dual_workers.values(), self._cross_worker):
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

    def dual_of(self, spec: str) -> tuple[DualEncoder, DeviceWorker]:
        """The loaded dual encoder ``spec`` and its worker. EncoderMismatchError (409) when this server does
        not hold it (naming why, when loading it failed)."""
        dual, worker = self.duals.get(spec), self._dual_workers.get(spec)
        if dual is None or worker is None:
            err = self._dual_errors.get(spec)
            why = f": loading it failed ({err.message})" if err is not None else ""
            raise EncoderMismatchError(
                f"this server does not hold dual encoder {spec!r}{why}",
                detail={"expected": spec, "loaded": sorted(self.duals)},
            )
        return dual, worker

    def models_info(self) -> ModelsInfo:
        if self.dual is None:
            raise NotReadyError("models are still loading")
        return ModelsInfo(
            dual_encoder=self.dual.info.spec,
            dual_encoder_id=self.dual.info.id,
            dual_encoders=list(self.duals) or [self.dual.info.spec],
            reranker=None if self.cross is None else self.cross.info.spec,
            reranker_id=None if self.cross is None else self.cross.info.id,
            device=self.settings.models.device,
            precision=precision_label(self.dual, self.cross, self.settings.models.precision),
            runtime=runtime_label(self.dual, self.cross),
            default_fusion=None if self.cross is None else self.cross.info.default_fusion,
        )

    def _itc_logit_scale(self, dual: DualEncoder | None = None) -> float | None:
        dual = self.dual if dual is None else dual
        return None if dual is None else dual.info.itc_logit_scale

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (disk, SQLite, FAISS, image decoding) on the I/O pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    # -- admission (see :mod:`.admission`) --------------------------------------------------------------
    def _on_batch(self, ev: BatchEvent) -> None:
        self.admission.device_time(ev.run_s)
        self.metrics.on_batch(ev)

    def _enter(self) -> None:
        d = self.admission.try_enter()
        if not d.admitted:
            self.metrics.rejected.labels(d.reason).inc()
            if d.reason == "concurrency":
                message = f"too many concurrent searches ({self.admission.in_flight})"
            else:
                message = (
                    f"overloaded: a new search would wait about {d.expected_wait_s:.1f} s, over the "
                    f"admission deadline of {self.admission.config.max_queue_wait_s:g} s"
                )
            raise OverloadedError(message, retry_after=d.retry_after_s)
        self.metrics.in_flight.inc()
        self.metrics.expected_wait.set(self.admission.expected_wait())

    def _leave(self) -> None:
        idle = self.admission.leave()
        self.metrics.in_flight.dec()
        self.metrics.expected_wait.set(self.admission.expected_wait())
        self.metrics.search_cost.set(self.admission.cost_s)
        if idle and self.admission.due_for_trim() and not self._closed:
            with contextlib.suppress(RuntimeError):  # the pool was shut down meanwhile
                self._pool.submit(trim_memory)


def _depth(worker: DeviceWorker) -> float:
    return float(worker.depth)
