"""DeviceWorker: micro-batching, bounded queue, timeouts, failures (plain functions as handlers)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from alignfuse.errors import OverloadedError, RequestTimeoutError
from alignfuse.service.batching import BatchConfig, BatchEvent, DeviceWorker


class Recorder:
    """A handler that records every batch it is given and can be held at a gate."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.batches.append(list(payloads))
        return [p * 10 for p in payloads]


def _worker(handlers: dict[str, Any], **cfg: Any) -> DeviceWorker:
    events: list[BatchEvent] = []
    w = DeviceWorker("test", handlers, BatchConfig(**cfg), on_batch=events.append)
    w.events = events  # type: ignore[attr-defined]
    w.start()
    return w


def test_concurrent_tasks_are_batched_and_results_routed() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    w = _worker({"x": rec}, max_batch=8, max_wait_s=0.5, queue_size=64)
    try:
        first = w.submit("x", 0)
        assert rec.entered.wait(5)  # the worker is busy with task 0
        futures = [w.submit("x", i) for i in range(1, 8)]
        gate.set()
        assert first.result(5) == 0
        assert [f.result(5) for f in futures] == [i * 10 for i in range(1, 8)]
        assert rec.batches[0] == [0]
        assert rec.batches[1] == list(range(1, 8))  # queued while busy: one batch, in order
        assert [e.size for e in w.events] == [1, 7]  # type: ignore[attr-defined]
    finally:
        w.stop()


def test_max_batch_one_runs_every_task_alone() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    w = _worker({"x": rec}, max_batch=1, max_wait_s=0.0, queue_size=64)
    try:
        futures = [w.submit("x", i) for i in range(5)]
        gate.set()
        assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40]
        assert rec.batches == [[0], [1], [2], [3], [4]]
    finally:
        w.stop()


def test_kinds_are_never_mixed_and_cost_bound_respected() -> None:
    gate = threading.Event()
    a, b = Recorder(gate), Recorder()
    w = _worker({"a": a, "b": b}, max_batch=100, max_wait_s=0.2, queue_size=64, max_cost={"a": 10})
    try:
        f0 = w.submit("a", 0, cost=1)
        assert a.entered.wait(5)
        fs = [
            w.submit("a", 1, cost=6),
            w.submit("b", 2),
            w.submit("a", 3, cost=6),
            w.submit("b", 4),
            w.submit("a", 5, cost=3),
        ]
        gate.set()
        for f in [f0, *fs]:
            f.result(5)
        assert a.batches[0] == [0]
        # costs 6 + 6 > 10: the second 6 waits; 6 + 3 fits
        assert a.batches[1] == [1, 5]
        assert a.batches[2] == [3]
        assert b.batches == [[2, 4]]
    finally:
        w.stop()


def test_full_queue_fails_fast_with_overloaded() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    w = _worker({"x": rec}, max_batch=4, max_wait_s=0.0, queue_size=2)
    try:
        w.submit("x", 0)
        assert rec.entered.wait(5)
        w.submit("x", 1)
        w.submit("x", 2)
        with pytest.raises(OverloadedError) as info:
            w.submit("x", 3)
        assert info.value.retry_after >= 1.0
        assert w.depth == 2
    finally:
        gate.set()
        w.stop()


def test_timeout_cancels_the_task_and_it_is_skipped() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    w = _worker({"x": rec}, max_batch=4, max_wait_s=0.0, queue_size=8)
    try:
        busy = w.submit("x", 0)
        assert rec.entered.wait(5)

        async def go() -> None:
            await w.run("x", 99, timeout=0.05)

        with pytest.raises(RequestTimeoutError):
            asyncio.run(go())
        gate.set()
        busy.result(5)
        assert w.submit("x", 5).result(5) == 50
        assert all(99 not in b for b in rec.batches)  # the timed-out task never ran
    finally:
        gate.set()
        w.stop()


def test_handler_error_reaches_every_task_of_the_batch_and_worker_survives() -> None:
    calls = {"n": 0}

    def flaky(payloads: list[Any]) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return payloads

    w = _worker({"x": flaky}, max_batch=4, max_wait_s=0.0, queue_size=8)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            w.submit("x", 1).result(5)
        assert w.submit("x", 2).result(5) == 2
    finally:
        w.stop()


def test_per_task_exception_results_and_stop_fails_pending() -> None:
    def mixed(payloads: list[Any]) -> list[Any]:
        return [ValueError(str(p)) if p < 0 else p for p in payloads]

    w = _worker({"x": mixed}, max_batch=4, max_wait_s=0.0, queue_size=8)
    with pytest.raises(ValueError):
        w.submit("x", -1).result(5)
    assert w.submit("x", 3).result(5) == 3
    w.stop()
    with pytest.raises(OverloadedError):
        w.submit("x", 1)


def test_async_run_from_many_tasks() -> None:
    w = _worker({"x": lambda ps: [p + 1 for p in ps]}, max_batch=16, max_wait_s=0.01, queue_size=256)
    try:

        async def go() -> list[int]:
            return list(await asyncio.gather(*[w.run("x", i, timeout=5) for i in range(50)]))

        assert asyncio.run(go()) == [i + 1 for i in range(50)]
        sizes = [e.size for e in w.events]  # type: ignore[attr-defined]
        assert sum(sizes) == 50 and max(sizes) <= 16  # every task ran once, in batches of at most max_batch
    finally:
        w.stop()


def test_lone_task_does_not_wait_when_nothing_is_announced() -> None:
    rec = Recorder()
    w = DeviceWorker(
        "test", {"x": rec}, BatchConfig(max_batch=8, max_wait_s=60.0, queue_size=8), announced=True
    )
    w.start()
    try:
        # announced and submitted: the submit consumes the announcement atomically, so the worker does
        # not hold the batch open for a task that is already queued (it would block for 60 s)
        w.expect()
        assert w.submit("x", 1, expected=True).result(10) == 10
        assert w.expected == 0
        w.expect(2)  # two requests on their way: the worker holds the batch open for the second one
        f2 = w.submit("x", 2, expected=True)
        while w.depth:  # the worker took task 2 (under its lock) and is now waiting for more
            time.sleep(0.001)
        time.sleep(0.05)
        assert not f2.done()
        f3 = w.submit("x", 3, expected=True)  # joins the open batch; nothing else is announced
        assert (f2.result(10), f3.result(10)) == (20, 30)
        assert rec.batches[1] == [2, 3]
        # a withdrawn announcement releases a batch held open for it
        w.expect(2)
        f4 = w.submit("x", 4, expected=True)
        while w.depth:
            time.sleep(0.001)
        time.sleep(0.05)
        assert not f4.done()
        w.unexpect()
        assert f4.result(10) == 40
        assert rec.batches[2] == [4]
    finally:
        w.stop()


def test_workers_sharing_a_device_lock_never_compute_at_once() -> None:
    lock = threading.Lock()
    active = {"n": 0, "max": 0}
    guard = threading.Lock()

    def handler(payloads: list[Any]) -> list[Any]:
        with guard:
            active["n"] += 1
            active["max"] = max(active["max"], active["n"])
        time.sleep(0.01)
        with guard:
            active["n"] -= 1
        return payloads

    cfg = BatchConfig(max_batch=2, max_wait_s=0.0, queue_size=64)
    a = DeviceWorker("a", {"x": handler}, cfg, device_lock=lock)
    b = DeviceWorker("b", {"x": handler}, cfg, device_lock=lock)
    a.start()
    b.start()
    try:
        futs = [w.submit("x", i) for i in range(20) for w in (a, b)]
        assert sorted(f.result(10) for f in futs) == sorted(list(range(20)) * 2)
        assert active["max"] == 1
    finally:
        a.stop()
        b.stop()

    # without the shared lock the same two workers do overlap (the check above could fail)
    a = DeviceWorker("a", {"x": handler}, cfg)
    b = DeviceWorker("b", {"x": handler}, cfg)
    a.start()
    b.start()
    try:
        futs = [w.submit("x", i) for i in range(20) for w in (a, b)]
        for f in futs:
            f.result(10)
        assert active["max"] == 2
    finally:
        a.stop()
        b.stop()
