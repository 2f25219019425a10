"""Shared pieces of ``bench/peers.py``: machine record, peer venvs, server subprocesses, the load generator."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PEERS_DIR = Path("/work/peers")
PEERS = ("clip-retrieval", "infinity")


def peers_dir() -> Path:
    return Path(os.environ.get("ALIGNFUSE_PEERS_DIR", str(DEFAULT_PEERS_DIR)))


@dataclass(frozen=True)
class Peer:
    """A peer's venv: present when scripts/peers-venv.sh finished installing it (its stamp file)."""

    name: str
    venv: Path

    @property
    def installed(self) -> bool:
        return (self.venv / ".alignfuse-peer-ok").is_file()

    @property
    def version(self) -> str | None:
        stamp = self.venv / ".alignfuse-peer-ok"
        return stamp.read_text().strip() if stamp.is_file() else None

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def skip_reason(self) -> str:
        return (
            f"{self.name} venv not found in the peers folder ($ALIGNFUSE_PEERS_DIR, default as in "
            f"scripts/peers-venv.sh): run scripts/peers-venv.sh {self.name}"
        )


def peer(name: str) -> Peer:
    return Peer(name, peers_dir() / name)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def rel(path: Path | str) -> str:
    """A path relative to the repository (JSON records relative paths only)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return p.name


def thread_env(threads: int) -> dict[str, str]:
    """The same intra-op thread count for every system (torch reads these at start)."""
    t = str(threads)
    return {
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "TOKENIZERS_PARALLELISM": "false",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A server subprocess whose output is kept (last lines) for error reports."""

    cmd: list[str]
    env: dict[str, str]
    cwd: Path = ROOT
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> Proc:
        self.proc = subprocess.Popen(
            self.cmd,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            del self.lines[:-200]

    def tail(self, n: int = 30) -> str:
        return "".join(self.lines[-n:])

    def wait_http(self, url: str, timeout: float, ok: Callable[[httpx.Response], bool]) -> float:
        """Poll ``url`` until ``ok``; returns the seconds it took. Raises with the output tail on failure."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if ok(httpx.get(url, timeout=5)):
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"not ready after {timeout:.0f} s: {url}\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -------------------------------------------------------------------------------------------------- load
RequestFn = Callable[[int], tuple[str, dict[str, Any]]]
"""Request ``i`` → (path, JSON body)."""


async def _load(url: str, make: RequestFn, concurrency: int, per_client: int) -> dict[str, Any]:
    latencies: list[float] = []
    sizes: list[int] = []
    codes: dict[int, int] = {}
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        path, body = make(0)  # one unmeasured request: connection set up, caches warm
        await client.post(path, json=body)

        async def worker(w: int) -> None:
            nonlocal errors
            for r in range(per_client):
                path, body = make(w + r * concurrency + 1)
                size = 0
                t0 = time.perf_counter()
                try:
                    resp = await client.post(path, json=body)
                    status, size = resp.status_code, len(resp.content)
                except httpx.HTTPError:
                    status = -1
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    sizes.append(size)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": errors,
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "mean_response_bytes": float(np.mean(sizes)) if sizes else None,
    }


def closed_loop(url: str, make: RequestFn, concurrency: int, requests_per_client: int) -> dict[str, Any]:
    """Closed-loop load with a fixed amount of work (like ``hey -n``): ``concurrency`` clients, each sends
    ``requests_per_client`` requests one after the other (the next when its previous answer arrives).
    Throughput = answered requests / wall time from the first send to the last answer; latency percentiles
    over every request. A fixed count rather than a time window: a server whose answers take longer than
    the window would otherwise show no completed request at all. The load average is recorded before and
    after."""
    before = loadavg()
    res = asyncio.run(_load(url, make, concurrency, requests_per_client))
    return {
        **res,
        "requests_per_client": requests_per_client,
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }
