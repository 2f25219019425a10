"""Overload is shed by measured capacity (issue 12, J and suite test 4).

Unit level: the admission controller admits while the expected wait (in flight × measured device seconds
per search) is under the deadline, and rejects at once past it, with a Retry-After that says how long the
excess takes to drain. End to end (slow): a real server on 127.0.0.1 under an open-loop load at 4× its
measured capacity for a bounded spike answers only 200s and 429s, the admitted searches' p99 stays within
the deadline plus their own service time, ``/readyz`` stays responsive, and the RSS returns within 20% of
its baseline afterwards. The 60 s version with its plot is ``bench/overload.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from alignfuse.service.engine.admission import Admission, AdmissionConfig, trim_memory

from .live import live_server

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_overload", ROOT / "bench" / "overload.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_overload"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_admission_rejects_when_expected_wait_exceeds_deadline() -> None:
    adm = Admission(AdmissionConfig(max_queue_wait_s=1.0, max_in_flight=1000, initial_cost_s=0.1, window=4))
    admitted = [adm.try_enter() for _ in range(30)]
    # 0.1 s per search: the 12th waits 1.1 s > 1 s
    assert [d.admitted for d in admitted].count(True) == 11
    last = admitted[-1]
    assert not last.admitted and last.reason == "capacity" and last.retry_after_s >= 1.0
    assert last.expected_wait_s == pytest.approx(1.1)
    # measured cost halves: 8 completions that cost 0.05 s of device time each
    for _ in range(8):
        adm.device_time(0.05)
        adm.leave()
    assert adm.cost_s < 0.1
    assert adm.try_enter().admitted  # 3 in flight × ~0.085 s


def test_admission_hard_cap_and_a_lone_request_always_runs() -> None:
    adm = Admission(AdmissionConfig(max_queue_wait_s=0.01, max_in_flight=2, initial_cost_s=10.0))
    assert adm.try_enter().admitted  # nothing in flight: never rejected, however slow searches are
    d = adm.try_enter()
    assert not d.admitted and d.reason == "capacity" and d.retry_after_s == pytest.approx(10.0 - 0.01)
    off = Admission(AdmissionConfig(max_queue_wait_s=0.0, max_in_flight=2, initial_cost_s=10.0))
    assert off.try_enter().admitted and off.try_enter().admitted  # deadline 0: capacity check off
    d = off.try_enter()
    assert not d.admitted and d.reason == "concurrency"


def test_trim_after_idle() -> None:
    adm = Admission(AdmissionConfig(trim_interval_s=0.0))
    assert not adm.due_for_trim()  # nothing admitted yet
    adm.try_enter()
    assert not adm.due_for_trim()  # busy
    assert adm.leave()
    assert adm.due_for_trim() and not adm.due_for_trim()  # once per spike
    assert trim_memory() in (True, False)


def test_overload_gets_fast_429_with_retry_after(client_factory: Any) -> None:
    """A burst far over capacity: 429s come with Retry-After and the reason, and fast."""
    import httpx

    from .conftest import async_client

    client = client_factory(batching={"max_queue_wait_ms": 50.0})
    app = client.app

    async def run() -> list[httpx.Response]:
        async with async_client(app) as c:  # type: ignore[arg-type]
            reqs = [
                c.post("/v1/search", json={"collection": "plain", "text": f"q {i}", "candidates": 24})
                for i in range(40)
            ]
            return list(await asyncio.gather(*reqs))

    codes = [r.status_code for r in asyncio.run(run())]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spike_at_4x_capacity_is_shed(root: Path) -> None:
    bench = _bench()
    deadline_ms = 500.0
    queries = _captions()
    env = {"ALIGNFUSE_BATCHING__MAX_QUEUE_WAIT_MS": str(deadline_ms)}
    with live_server(root, env) as server:
        pid = server.proc.pid
        cap = asyncio.run(bench.capacity(server.url, "scenes", queries, 4.0))
        assert cap > 0
        asyncio.run(asyncio.sleep(1.0))
        baseline = bench.rss_of(pid)
        res = asyncio.run(
            bench.spike(
                server.url, "scenes", queries, rate=4 * cap, seconds=15.0, rss=lambda: bench.rss_of(pid)
            )
        )
        recovered, series = bench.recover(lambda: bench.rss_of(pid), baseline, timeout_s=30.0)
        alive = server.alive()
        log = server.output
    report = json.dumps({k: v for k, v in res.__dict__.items() if k != "samples"}, default=str)
    assert alive and "Traceback" not in log, log[-3000:]
    assert set(res.statuses) <= {"200", "429"}, report
    assert res.share_429 > 0.3, report  # at 4x capacity most of the excess is refused ...
    assert res.ok_per_s > 0.5 * cap, report  # ... while the server keeps serving near capacity
    # admitted searches: bounded by the deadline plus their own service time. The margins are wide because
    # the suite's machine is shared (its other jobs, this test's client); without admission by capacity the
    # queue grows for the whole spike and p50 alone passes 10 s (issue 12: p99 13 s at 256 clients)
    assert res.p99_ms is not None and res.p99_ms < 3 * deadline_ms + 1000.0 + 4000.0 / cap, report
    # refused at once: no queueing behind the admitted ones (what it costs is a connection and a parse on
    # the same busy CPUs)
    assert res.p99_429_ms is not None and res.p99_429_ms < 2000.0, report
    assert res.retry_after_s and min(res.retry_after_s) >= 1, report
    # readiness never fails and is answered like a refusal is: both are a parse on the same busy CPUs, shared
    # with this test's own client sending ~500 requests/s (CI measured 1.12 s max with 429 p99 at 1.12 s)
    assert res.readyz_max_ms < 2000.0, report
    assert recovered, (baseline / 2**20, series[-3:], report)


def _captions() -> list[str]:
    return [
        "a red circle left of a blue square",
        "two green triangles",
        "a yellow square above a red circle",
        "three blue circles",
        "a purple triangle right of a green square",
    ]
