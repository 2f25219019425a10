"""A real ``alignfuse serve`` process (uvicorn) on 127.0.0.1 for the tests that need one: start it, wait
until it is ready, read its RSS, stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .conftest import CROSS_SPEC, DUAL_SPEC


@dataclass
class LiveServer:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def rss_bytes(self) -> int:
        """Resident set size of the server process (from /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextmanager
def live_server(
    root: Path,
    env: Mapping[str, str] | None = None,
    *,
    reranker: str = CROSS_SPEC,
    timeout: float = 120.0,
) -> Iterator[LiveServer]:
    """Serve ``root`` with the test models on a free loopback port; yields once ``/readyz`` is 200."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-c",
        "from alignfuse.service.cli import main; main()",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--collections",
        str(root),
        "--model",
        DUAL_SPEC,
        "--reranker",
        reranker,
    ]
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + timeout
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            for line in list(lines):
                m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                if m:
                    url = m.group(1)
            time.sleep(0.1)
        assert url is not None, "".join(lines)
        with httpx.Client(base_url=url, timeout=10) as c:
            while time.monotonic() < deadline and c.get("/readyz").status_code != 200:
                time.sleep(0.2)
            assert c.get("/readyz").status_code == 200, "".join(lines)
        yield LiveServer(proc, url, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
