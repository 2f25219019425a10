"""Service throughput and latency: micro-batching vs per-request execution, rerank on and off.

Builds a small scenes collection with the benchmark's dual encoder (and the reranker's feature cache), then
starts two real ``alignfuse serve`` processes on 127.0.0.1: one with micro-batching (``--max-batch``) and one
per-request (``ALIGNFUSE_BATCHING__MAX_BATCH=1``). Against each it runs a bounded, closed-loop asyncio load
(httpx: ``concurrency`` clients, each sending its next text query when the previous answer arrives) for
``--duration`` seconds per cell, rerank off and on, at each concurrency; the cells alternate between the two
servers so that drift in the machine's background load affects both alike. Reports throughput, p50/p99
latency, errors, and the mean micro-batch size of query encoding (from ``/metrics``).

Usage::

    python bench/service.py                                # ~4 min on 2 CPU cores
    python bench/service.py --model open_clip:ViT-B-32 --duration 12 --concurrency 1,8,32

Writes ``bench/results/service.json`` and ``bench/results/service.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.service")


# ------------------------------------------------------------------------------------------ collection
def build_bench_collection(root: Path, model: str, reranker: str, scenes: int) -> list[str]:
    """A scenes collection built with ``model`` (+ rerank cache by ``reranker``); returns query captions."""
    import torch

    from alignfuse.data.scenes import generate_scenes
    from alignfuse.index import BuildOptions, KarpathySource, build_collection
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = root.parent / "data"
    js = generate_scenes(data, seed=11, count=scenes, size=64)
    dual = create_dual_encoder(model)
    cross = create_cross_encoder(reranker)
    t = time.perf_counter()
    rep = build_collection(
        root / "bench",
        KarpathySource(js),
        dual,
        options=BuildOptions(progress=False, batch_size=64, rerank_cache=True),
        cross_encoder=cross,
    )
    log.info("built %s: %d items in %.1f s", rep.collection, rep.added, time.perf_counter() - t)
    entries = json.loads(js.read_text())
    captions = [c for e in entries for c in e["caption"]]
    return captions


# ------------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``alignfuse serve`` in a subprocess on a free loopback port."""

    def __init__(self, root: Path, model: str, reranker: str, env: dict[str, str]) -> None:
        port = _free_port()
        cmd = [
            sys.executable, "-c", "from alignfuse.service.cli import main; main()", "serve",
            "--host", "127.0.0.1", "--port", str(port), "--collections", str(root),
            "--model", model, "--reranker", reranker, "--log-level", "warning",
        ]  # fmt: skip
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        self.url = f"http://127.0.0.1:{port}"
        self._wait_ready(300)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready:\n" + "".join(self.lines[-20:]))

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until no search is in flight (requests a client abandoned still finish on the server)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = httpx.get(self.url + "/metrics", timeout=30).text
            m = re.search(r"^alignfuse_searches_in_flight (\S+)$", text, re.M)
            if m is None or float(m.group(1)) == 0:
                return
            time.sleep(0.2)
        log.warning("server still busy after %.0f s", timeout)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("alignfuse_batch_size_") and 'kind="texts"' in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -------------------------------------------------------------------------------------------------- load
async def load(
    url: str,
    queries: list[str],
    concurrency: int,
    duration: float,
    warmup: float,
    body: dict[str, Any],
    grace: float = 30.0,
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, each sends its next query when its previous answer arrives.
    Only requests that start after ``warmup`` and finish before ``warmup + duration`` are counted."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        t_measure = start + warmup
        t_end = t_measure + duration

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await client.post("/v1/search", json={**body, "text": queries[i % len(queries)]})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                t1 = time.perf_counter()
                i += concurrency
                if t0 >= t_measure and t1 <= t_end:
                    codes[status] = codes.get(status, 0) + 1
                    if status == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        # a hard stop: requests still running long after the window are abandoned (and reported)
        _, pending = await asyncio.wait(tasks, timeout=warmup + duration + grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    lat = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": errors,
        "abandoned": len(pending),
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "throughput_rps": len(latencies) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
    }


def batch_stats(before: dict[str, float], after: dict[str, float]) -> float | None:
    key_sum = next(
        (k for k in after if k.startswith("alignfuse_batch_size_sum") and 'worker="dual"' in k), None
    )
    key_cnt = next(
        (k for k in after if k.startswith("alignfuse_batch_size_count") and 'worker="dual"' in k), None
    )
    if key_sum is None or key_cnt is None:
        return None
    n = after[key_cnt] - before.get(key_cnt, 0.0)
    s = after[key_sum] - before.get(key_sum, 0.0)
    return s / n if n > 0 else None


# -------------------------------------------------------------------------------------------------- plot
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {True: ("#4f7cff", "micro-batched"), False: ("#ff7a59", "per-request")}
    for batching in (True, False):
        for rerank, ls in ((False, "-"), (True, "--")):
            pts = sorted(
                (c["concurrency"], c["throughput_rps"], c["p99_ms"])
                for c in cells
                if c["batching"] == batching and c["rerank"] == rerank
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            colour, label = styles[batching]
            lab = f"{label}, rerank {'on' if rerank else 'off'}"
            axes[0].plot(xs, [p[1] for p in pts], ls, marker="o", color=colour, label=lab)
            axes[1].plot(xs, [p[2] for p in pts], ls, marker="o", color=colour, label=lab)
    for ax, title, ylabel in (
        (axes[0], "Throughput", "requests / s"),
        (axes[1], "p99 latency", "ms (log)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["concurrency"])
        ax.set_xticklabels([str(c) for c in results["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"alignfuse serve: {results['model']} + {results['reranker']} "
        f"(C={results['candidates']}, {results['machine']['cpus']} CPUs)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="open_clip:ViT-B-32", help="dual-encoder spec (random init is fine)")
    ap.add_argument("--reranker", default="albef:tiny")
    ap.add_argument("--scenes", type=int, default=60, help="scenes in the benchmark collection")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="measured seconds per cell (twice that at the top concurrency)",
    )
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell")
    ap.add_argument("--candidates", type=int, default=32, help="C: candidates reranked per query")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=32, help="micro-batch size of the batched server")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    concurrency = [int(c) for c in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="alignfuse-bench-"))
    t_all = time.perf_counter()
    try:
        root = tmp / "collections"
        queries = build_bench_collection(root, args.model, args.reranker, args.scenes)
        rng = np.random.default_rng(0)
        queries = [queries[i] for i in rng.permutation(len(queries))]
        cells: list[dict[str, Any]] = []
        common_env = {
            "ALIGNFUSE_LIMITS__REQUEST_TIMEOUT_S": "300",
            "ALIGNFUSE_BATCHING__QUEUE_SIZE": "1024",
            "ALIGNFUSE_BATCHING__MAX_WAIT_MS": str(args.max_wait_ms),
        }
        # both servers run side by side (one idles while the other is measured) and the cells alternate
        # between them, so a change in the machine's background load hits both modes alike
        servers: dict[bool, Server] = {}
        try:
            for batching in (True, False):
                env = {**common_env, "ALIGNFUSE_BATCHING__MAX_BATCH": str(args.max_batch if batching else 1)}
                log.info("starting server (%s)", "micro-batched" if batching else "per-request")
                servers[batching] = Server(root, args.model, args.reranker, env)
            for rerank in (False, True):
                body = {"collection": "bench", "k": args.k, "candidates": args.candidates, "rerank": rerank}
                for conc in concurrency:
                    for batching in (True, False):
                        server = servers[batching]
                        server.wait_idle()
                        before = server.metrics()
                        # the top concurrency decides the target: measure it twice as long (less noise)
                        duration = args.duration * (2 if conc == max(concurrency) else 1)
                        res = asyncio.run(load(server.url, queries, conc, duration, args.warmup, body))
                        mean_batch = batch_stats(before, server.metrics())
                        cells.append(
                            {
                                "batching": batching,
                                "max_batch": args.max_batch if batching else 1,
                                "rerank": rerank,
                                "concurrency": conc,
                                "duration_s": duration,
                                **res,
                                "mean_encode_batch": mean_batch,
                            }
                        )
                        log.info(
                            "%-13s rerank=%-5s conc=%3d: %7.1f req/s  p50 %8.1f ms  p99 %8.1f ms  batch %.1f  "
                            "errors %d",
                            "batched" if batching else "per-request",
                            rerank,
                            conc,
                            res["throughput_rps"],
                            res["p50_ms"] or float("nan"),
                            res["p99_ms"] or float("nan"),
                            mean_batch or float("nan"),
                            res["errors"],
                        )
        finally:
            for server in servers.values():
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def cell(b: bool, r: bool, c: int) -> dict[str, Any] | None:
        return next(
            (x for x in cells if x["batching"] == b and x["rerank"] == r and x["concurrency"] == c), None
        )

    top = max(concurrency)
    summary = {}
    for rerank in (False, True):
        b, p = cell(True, rerank, top), cell(False, rerank, top)
        if b and p and p["throughput_rps"] > 0:
            summary[f"rerank_{'on' if rerank else 'off'}"] = {
                "concurrency": top,
                "throughput_speedup": b["throughput_rps"] / p["throughput_rps"],
                "p99_batched_ms": b["p99_ms"],
                "p99_per_request_ms": p["p99_ms"],
                "target_met": bool(
                    b["throughput_rps"] >= 3 * p["throughput_rps"] and (b["p99_ms"] or 0) < (p["p99_ms"] or 0)
                ),
            }
    import torch

    results = {
        "benchmark": "service",
        "model": args.model,
        "reranker": args.reranker,
        "candidates": args.candidates,
        "k": args.k,
        "scenes": args.scenes,
        "concurrency": concurrency,
        "duration_s": args.duration,  # per cell; twice that at the top concurrency
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "loadavg_at_end": list(os.getloadavg()),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.perf_counter() - t_all,
        "cells": cells,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log.info("wrote %s and %s (%.0f s)", args.out, args.out.with_suffix(".png"), results["wall_s"])
    for k, v in summary.items():
        log.info("%s at concurrency %d: %.2fx throughput, p99 %.0f ms vs %.0f ms, target met: %s", k,
                 v["concurrency"], v["throughput_speedup"], v["p99_batched_ms"], v["p99_per_request_ms"], v["target_met"])  # fmt: skip


if __name__ == "__main__":
    main()
