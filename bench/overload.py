"""Overload: an open-loop load at a multiple of the measured capacity, against a real server on 127.0.0.1.

Builds a small scenes collection (the rerank feature cache included), starts ``alignfuse serve`` with an
admission deadline (``ALIGNFUSE_BATCHING__MAX_QUEUE_WAIT_MS``), then

1. measures capacity: a closed loop of a few clients for ``--calibrate`` seconds (successful searches/s);
2. records the baseline RSS of the server process (after that warm-up);
3. offers ``--factor`` × capacity for ``--duration`` seconds, open loop (a request every 1/rate s whatever
   the answers do), text→image searches with rerank; meanwhile it samples the server's RSS and the latency
   of ``/readyz`` every ``--sample`` s;
4. waits (at most ``--recover`` s) for the RSS to come back within 20% of the baseline.

Reports req/s offered and answered, the share of 429s, p50/p99 of the admitted (200) searches, the
statuses seen, ``/readyz`` latency, and RSS over time. The test ``tests/service/test_overload.py`` runs
the same functions for a shorter spike.

Usage::

    python bench/overload.py                      # 60 s at 4x capacity, ~2 min on 2 CPU cores
    python bench/overload.py --duration 20 --factor 4 --deadline-ms 500

Writes ``bench/results/overload.json`` and ``bench/results/overload.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.overload")


def rss_of(pid: int) -> int:
    """Resident set size of a process, bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _body(collection: str, query: str, candidates: int) -> dict[str, Any]:
    return {"collection": collection, "text": query, "k": 5, "candidates": candidates}


async def capacity(
    url: str, collection: str, queries: Sequence[str], seconds: float, clients: int = 4, candidates: int = 24
) -> float:
    """Successful searches per second of a closed loop of ``clients`` (each sends when answered)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    requests = [_request_bytes(host, port, _body(collection, q, candidates)) for q in queries]
    done = 0
    stop = time.monotonic() + seconds
    rng = random.Random(0)

    async def client() -> None:
        nonlocal done
        while time.monotonic() < stop:
            status, _ = await raw_post(host, port, rng.choice(requests))
            if status == 200:
                done += 1
            elif status == 429:
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.monotonic() - t0)


async def raw_post(host: str, port: int, request: bytes) -> tuple[int, str]:
    """One HTTP/1.1 request on its own connection, read with asyncio streams: (status, Retry-After).

    The load generator shares the CPUs with the server; httpx spends several ms of CPU per request, enough
    to make the client the bottleneck at a few dozen requests/s on 2 busy cores. This costs a fraction."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        length = int(headers.get("content-length", "0"))
        if length:
            await reader.readexactly(length)
        return status, headers.get("retry-after", "")
    finally:
        writer.close()


def _request_bytes(host: str, port: int, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST /v1/search HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


@dataclass
class SpikeResult:
    rate: float
    duration_s: float
    statuses: dict[str, int]
    sent: int
    answered_per_s: float
    ok_per_s: float
    share_429: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    p99_429_ms: float | None
    retry_after_s: list[int]
    readyz_max_ms: float
    readyz_p99_ms: float
    samples: list[dict[str, float]] = field(default_factory=list)
    """Every ``sample`` s: t (s since the spike began), rss_mb, readyz_ms, ok and rejected so far."""


async def spike(
    url: str,
    collection: str,
    queries: Sequence[str],
    *,
    rate: float,
    seconds: float,
    rss: Callable[[], int],
    sample_s: float = 0.5,
    candidates: int = 24,
    client_timeout_s: float = 30.0,
) -> SpikeResult:
    """Open-loop load: one search every 1/rate s for ``seconds``, whatever the server answers."""
    rng = random.Random(1)
    results: list[tuple[int, float, str]] = []  # status, latency s, retry-after
    samples: list[dict[str, float]] = []
    readyz: list[float] = []
    t0 = time.monotonic()

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    requests = {q: _request_bytes(host, port, _body(collection, q, candidates)) for q in queries}

    async def one(q: str) -> None:
        start = time.monotonic()
        try:
            status, retry = await asyncio.wait_for(raw_post(host, port, requests[q]), client_timeout_s)
            results.append((status, time.monotonic() - start, retry))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            results.append((0, time.monotonic() - start, type(exc).__name__))

    async def sampler(probe: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            s = time.monotonic()
            try:
                ok = (await probe.get("/readyz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            ms = (time.monotonic() - s) * 1e3 if ok else float("inf")
            readyz.append(ms)
            samples.append(
                {
                    "t": round(s - t0, 3),
                    "rss_mb": rss() / 2**20,
                    "readyz_ms": ms,
                    "ok": sum(1 for st, _, _ in results if st == 200),
                    "rejected": sum(1 for st, _, _ in results if st == 429),
                }
            )
            await asyncio.sleep(max(0.0, sample_s - (time.monotonic() - s)))

    async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
        tasks: list[asyncio.Task[None]] = []
        sampling = asyncio.create_task(sampler(probe, t0 + seconds))
        n = int(rate * seconds)
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rng.choice(queries))))
        await asyncio.gather(*tasks)
        await sampling
    wall = time.monotonic() - t0
    statuses: dict[str, int] = {}
    for st, _, _ in results:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    ok = np.array([lat for st, lat, _ in results if st == 200]) * 1e3
    rej = np.array([lat for st, lat, _ in results if st == 429]) * 1e3
    retry = sorted({int(ra) for st, _, ra in results if st == 429 and ra.isdigit()})
    finite = [x for x in readyz if np.isfinite(x)]
    return SpikeResult(
        rate=rate,
        duration_s=seconds,
        statuses=statuses,
        sent=len(results),
        answered_per_s=len(results) / wall,
        ok_per_s=len(ok) / wall,
        share_429=len(rej) / max(1, len(results)),
        p50_ms=float(np.percentile(ok, 50)) if len(ok) else None,
        p99_ms=float(np.percentile(ok, 99)) if len(ok) else None,
        max_ms=float(ok.max()) if len(ok) else None,
        p99_429_ms=float(np.percentile(rej, 99)) if len(rej) else None,
        retry_after_s=retry,
        readyz_max_ms=max(readyz) if readyz else float("inf"),
        readyz_p99_ms=float(np.percentile(finite, 99)) if finite else float("inf"),
        samples=samples,
    )


def recover(
    rss: Callable[[], int],
    baseline: int,
    *,
    within: float = 0.2,
    timeout_s: float = 30.0,
    t_offset: float = 0.0,
) -> tuple[bool, list[dict[str, float]]]:
    """Sample the RSS every 0.5 s until it is within ``within`` of ``baseline`` (True) or ``timeout_s``."""
    series: list[dict[str, float]] = []
    t0 = time.monotonic()
    while True:
        now = rss()
        series.append({"t": round(t_offset + time.monotonic() - t0, 3), "rss_mb": now / 2**20})
        if now <= baseline * (1 + within):
            return True, series
        if time.monotonic() - t0 > timeout_s:
            return False, series
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------- main
def _bench_service() -> Any:
    spec = importlib.util.spec_from_file_location("bench_service", ROOT / "bench" / "service.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_service"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["spike"]
    samples = s["samples"] + results["recovery"]
    t = [x["t"] for x in samples]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(t, [x["rss_mb"] for x in samples], color="C0")
    axes[0].axhline(results["baseline_rss_mb"], color="grey", ls="--", label="baseline")
    axes[0].axhline(results["baseline_rss_mb"] * 1.2, color="grey", ls=":", label="baseline + 20%")
    axes[0].axvspan(0, s["duration_s"], color="C3", alpha=0.08, label="spike")
    axes[0].set(xlabel="s since the spike began", ylabel="server RSS (MB)", title="Memory")
    axes[0].legend(fontsize=8)
    sp = s["samples"]
    ts = [x["t"] for x in sp]
    ok = np.diff([0] + [x["ok"] for x in sp]) / np.diff([0.0] + ts)
    rej = np.diff([0] + [x["rejected"] for x in sp]) / np.diff([0.0] + ts)
    axes[1].plot(ts, ok, label="200/s", color="C2")
    axes[1].plot(ts, rej, label="429/s", color="C3")
    axes[1].axhline(s["rate"], color="grey", ls="--", label=f"offered {s['rate']:.0f}/s")
    axes[1].axhline(
        results["capacity_rps"], color="C2", ls=":", label=f"capacity {results['capacity_rps']:.0f}/s"
    )
    axes[1].set(xlabel="s", ylabel="responses per s", title="Admission")
    axes[1].legend(fontsize=8)
    labels = ["p50 200", "p99 200", "p99 429", "deadline", "readyz p99"]
    vals = [
        s["p50_ms"] or 0,
        s["p99_ms"] or 0,
        s["p99_429_ms"] or 0,
        results["deadline_ms"],
        s["readyz_p99_ms"],
    ]
    axes[2].bar(labels, vals, color=["C2", "C2", "C3", "grey", "C0"])
    axes[2].set(ylabel="ms", title=f"Latency ({s['share_429']:.0%} rejected)")
    fig.suptitle(
        f"{results['factor']}x capacity for {s['duration_s']:.0f} s, {results['machine']['cpus']} CPUs, "
        f"load {results['machine']['loadavg_at_end'][0]:.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--calibrate", type=float, default=8.0)
    p.add_argument("--deadline-ms", type=float, default=500.0)
    p.add_argument("--sample", type=float, default=0.5)
    p.add_argument("--recover", type=float, default=30.0)
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--model", default="alignfuse:random-tiny")
    p.add_argument("--reranker", default="albef:tiny")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bs = _bench_service()
    load_start = list(os.getloadavg())
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignfuse-overload-") as tmp:
        root = Path(tmp) / "collections"
        queries = bs.build_bench_collection(root, args.model, args.reranker, args.scenes)
        env = {"ALIGNFUSE_BATCHING__MAX_QUEUE_WAIT_MS": str(args.deadline_ms), "OMP_NUM_THREADS": "1"}
        server = bs.Server(root, args.model, args.reranker, env)
        try:
            pid = server.proc.pid
            cap = asyncio.run(capacity(server.url, "bench", queries, args.calibrate))
            server.wait_idle()
            time.sleep(1.0)
            baseline = rss_of(pid)
            rate = cap * args.factor
            log.info(
                "capacity %.1f req/s; baseline RSS %.0f MB; offering %.1f req/s", cap, baseline / 2**20, rate
            )
            res = asyncio.run(
                spike(server.url, "bench", queries, rate=rate, seconds=args.duration, rss=lambda: rss_of(pid))
            )
            recovered, series = recover(
                lambda: rss_of(pid), baseline, timeout_s=args.recover, t_offset=args.duration
            )
            alive = server.proc.poll() is None
        finally:
            server.stop()
    import torch

    results = {
        "what": "open-loop text->image searches with rerank at factor x the measured capacity",
        "factor": args.factor,
        "deadline_ms": args.deadline_ms,
        "capacity_rps": cap,
        "baseline_rss_mb": baseline / 2**20,
        "peak_rss_mb": max(x["rss_mb"] for x in res.samples) if res.samples else None,
        "recovered_within_20pct": recovered,
        "final_rss_mb": series[-1]["rss_mb"],
        "server_alive": alive,
        "only_200_and_429": set(res.statuses) <= {"200", "429"},
        "spike": asdict(res),
        "recovery": series,
        "model": args.model,
        "reranker": args.reranker,
        "scenes": args.scenes,
        "collection": "bench (tempdir; bench/service.py build_bench_collection)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "httpx": httpx.__version__,
            "device": "cpu",
            "server_omp_threads": 1,
            "loadavg_at_start": load_start,
            "loadavg_at_end": list(os.getloadavg()),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.perf_counter() - t_all,
        "script": "bench/overload.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log.info(
        "offered %.1f/s for %.0f s: %s, 200 p50 %.0f ms p99 %.0f ms, 429 share %.0f%%, RSS %.0f -> peak %.0f -> %.0f MB",
        rate, args.duration, res.statuses, res.p50_ms or -1, res.p99_ms or -1, 100 * res.share_429,
        baseline / 2**20, results["peak_rss_mb"] or -1, series[-1]["rss_mb"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
