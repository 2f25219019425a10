"""Micro-batching across concurrent requests: one device worker thread per model.

A :class:`DeviceWorker` owns one model. Requests submit *tasks* of a named kind to its bounded queue (the
engine's kinds: ``"texts"`` and ``"images"`` on the dual-encoder worker, ``"rerank"`` and ``"tokens"`` on the
cross-encoder worker; see :mod:`alignfuse.service.engine.kernels`); the worker thread takes the oldest task,
gathers more tasks of the same kind until the batch is full (``max_batch`` tasks or ``max_cost`` units, e.g.
rerank pairs) or the oldest task has waited ``max_wait``, runs the kind's handler once over the whole batch, and resolves each task's
future. A full queue fails fast with :class:`OverloadedError` (never an unbounded backlog); a caller that
stops waiting (timeout) cancels its task, and a cancelled task is skipped.

With ``max_batch=1`` every task runs alone: per-request execution, the baseline the benchmark compares to.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from alignfuse.errors import OverloadedError, RequestTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

Handler = Callable[[list[Any]], Sequence[Any]]
"""Runs one batch: takes the payloads, returns one result per payload (a BaseException fails that task)."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 32
    max_wait_s: float = 0.004
    queue_size: int = 256
    max_cost: Mapping[str, int] | None = None
    """Per-kind bound of the summed task costs in one batch (a single task may exceed it and runs alone)."""


@dataclass(frozen=True)
class BatchEvent:
    """What a worker reports after each batch (for metrics)."""

    worker: str
    kind: str
    size: int
    cost: int
    queue_wait_s: float
    run_s: float


class _Task(Generic[T]):
    __slots__ = ("cost", "enqueued", "future", "kind", "payload")

    def __init__(self, kind: str, payload: Any, cost: int) -> None:
        self.kind = kind
        self.payload = payload
        self.cost = cost
        self.enqueued = time.monotonic()
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()


class DeviceWorker:
    """One thread that owns one model and runs batched handlers on it."""

    def __init__(
        self,
        name: str,
        handlers: Mapping[str, Handler],
        config: BatchConfig,
        *,
        on_batch: Callable[[BatchEvent], None] | None = None,
        announced: bool = False,
        device_lock: threading.Lock | None = None,
    ) -> None:
        """``announced``: callers announce tasks before they submit them (:meth:`expect`), and the worker
        holds a batch open for up to ``max_wait`` only while an announced task is still on its way, so a
        lone request never pays the wait. False: always wait up to ``max_wait`` for a batch to fill.

        ``device_lock``: shared by the workers whose models sit on one device; a handler runs only while
        holding it. On a CPU, two workers computing at once each start a full set of intra-op threads and
        oversubscribe the cores (OpenMP threads spin while their peers are descheduled); on a GPU their
        kernels would serialise anyway."""
        self.name = name
        self._announced = announced
        self._expected = 0
        self._device_lock = device_lock
        self._handlers = dict(handlers)
        self.config = config
        self._on_batch = on_batch
        self._queue: collections.deque[_Task[Any]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ema_batch_s = 0.05

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"alignfuse-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; tasks still queued fail with OverloadedError."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for task in pending:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(OverloadedError("server is shutting down", retry_after=5.0))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        """Tasks waiting in the queue (not counting the batch running now)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting ------------------------------------------------------------------------------------
    def expect(self, n: int = 1) -> None:
        """Announce ``n`` tasks that will be submitted soon (with ``expected=True``) or withdrawn
        (:meth:`unexpect`). Only meaningful for a worker created with ``announced=True``."""
        with self._cond:
            self._expected += n

    def unexpect(self, n: int = 1) -> None:
        """Withdraw ``n`` announced tasks that will not be submitted after all."""
        with self._cond:
            self._expected = max(0, self._expected - n)
            self._cond.notify_all()

    @property
    def expected(self) -> int:
        """Announced tasks not yet submitted."""
        return self._expected

    def submit(
        self, kind: str, payload: Any, cost: int = 1, *, expected: bool = False
    ) -> concurrent.futures.Future[Any]:
        """Queue a task; raises OverloadedError at once when the queue is full. ``expected``: the task
        was announced with :meth:`expect`; the announcement is consumed atomically with the enqueue (also
        when the submit fails), so the worker never holds a batch open for a task already queued."""
        if kind not in self._handlers:
            raise KeyError(f"worker {self.name} has no handler for {kind!r}")
        task: _Task[Any] = _Task(kind, payload, max(1, int(cost)))
        with self._cond:
            if expected:
                self._expected = max(0, self._expected - 1)
            if self._stopping or self._thread is None:
                raise OverloadedError(f"{self.name} worker is not running", retry_after=5.0)
            if len(self._queue) >= self.config.queue_size:
                raise OverloadedError(
                    f"{self.name} queue is full ({self.config.queue_size} waiting)",
                    retry_after=self.retry_after(),
                )
            self._queue.append(task)
            self._cond.notify()
        return task.future

    async def run(self, kind: str, payload: Any, *, cost: int = 1, timeout: float | None = None) -> Any:
        """Submit and await the result; on timeout the task is cancelled and RequestTimeoutError raised."""
        return await self.wait(self.submit(kind, payload, cost), kind, timeout)

    async def wait(
        self, future: concurrent.futures.Future[Any], kind: str = "task", timeout: float | None = None
    ) -> Any:
        """Await a submitted task's result (cancelling it on timeout or when the caller is cancelled)."""
        wrapped = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(wrapped, timeout)
        except TimeoutError:
            future.cancel()
            raise RequestTimeoutError(
                f"request timed out waiting for {self.name} ({kind})", detail={"timeout_s": timeout}
            ) from None

    def run_sync(self, kind: str, payload: Any, *, cost: int = 1, timeout: float | None = None) -> Any:
        future = self.submit(kind, payload, cost)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestTimeoutError(
                f"request timed out waiting for {self.name} ({kind})", detail={"timeout_s": timeout}
            ) from None

    def retry_after(self) -> float:
        """A rough estimate of how long the current backlog takes to drain (seconds, at least 1)."""
        batches = math.ceil((len(self._queue) + 1) / max(1, self.config.max_batch))
        return max(1.0, batches * self._ema_batch_s)

    # -- the thread ------------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Task[Any]] | None:
        cfg = self.config
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch = [first]
            kind = first.kind
            max_cost = (cfg.max_cost or {}).get(kind)
            cost = first.cost
            deadline = first.enqueued + cfg.max_wait_s

            def full() -> bool:
                return len(batch) >= cfg.max_batch or (max_cost is not None and cost >= max_cost)

            while not full():
                # gather queued tasks of the same kind, oldest first
                taken = False
                for task in list(self._queue):
                    if full():
                        break
                    if task.kind != kind:
                        continue
                    if max_cost is not None and cost + task.cost > max_cost:
                        continue
                    self._queue.remove(task)
                    batch.append(task)
                    cost += task.cost
                    taken = True
                if full() or self._stopping:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._announced and self._expected <= 0):
                    break
                if not taken:
                    self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [t for t in batch if t.future.set_running_or_notify_cancel()]
            if not live:
                continue
            kind = live[0].kind
            lock = self._device_lock
            if lock is not None:
                lock.acquire()
            started = time.monotonic()
            try:
                results = self._handlers[kind]([t.payload for t in live])
                if len(results) != len(live):
                    raise RuntimeError(
                        f"{self.name}/{kind} handler returned {len(results)} results for {len(live)}"
                    )
            except BaseException as exc:
                log.exception("%s: %s batch of %d failed", self.name, kind, len(live))
                for t in live:
                    t.future.set_exception(exc)
                continue
            finally:
                run_s = time.monotonic() - started
                if lock is not None:
                    lock.release()
                self._ema_batch_s = 0.8 * self._ema_batch_s + 0.2 * run_s
            for t, res in zip(live, results, strict=True):
                if isinstance(res, BaseException):
                    t.future.set_exception(res)
                else:
                    t.future.set_result(res)
            if self._on_batch is not None:
                try:
                    self._on_batch(
                        BatchEvent(
                            worker=self.name,
                            kind=kind,
                            size=len(live),
                            cost=sum(t.cost for t in live),
                            queue_wait_s=started - live[0].enqueued,
                            run_s=run_s,
                        )
                    )
                except Exception:  # pragma: no cover - metrics must never break serving
                    log.exception("on_batch callback failed")
