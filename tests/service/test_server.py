"""A real ``alignfuse serve`` process (uvicorn) on 127.0.0.1, configured by flags and environment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .conftest import CROSS_SPEC, DUAL_SPEC, World


def _start(root: Path) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "ALIGNFUSE_LIMITS__MAX_K": "3",  # settings from the environment (nested delimiter)
        "ALIGNFUSE_API_KEY": "from-env",
        "OMP_NUM_THREADS": "1",
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
        CROSS_SPEC,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return proc, lines, t


def test_real_uvicorn_process(world: World, root: Path) -> None:
    proc, lines, pump = _start(root)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            for line in list(lines):
                m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                if m:
                    url = m.group(1)
            time.sleep(0.1)
        assert url is not None, "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < deadline:
                if c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.2)
            ready = c.get("/readyz").json()
            assert ready["models"]["dual_encoder"] == DUAL_SPEC and ready["models"]["reranker"] == CROSS_SPEC
            r = c.post("/v1/search", json={"collection": "scenes", "text": "a red circle", "k": 3})
            assert r.status_code == 200, r.text
            assert r.json()["reranked"] and len(r.json()["hits"]) == 3
            e = c.post("/v1/search", json={"collection": "scenes", "text": "a red circle", "k": 4})
            assert e.status_code == 422 and e.json()["error"]["detail"]["max"] == 3
            w = c.post("/v1/collections/plain/items", json={"texts": [{"text": "over the wire"}]})
            assert w.status_code == 401
            w = c.post(
                "/v1/collections/plain/items",
                json={"texts": [{"text": "over the wire"}]},
                headers={"Authorization": "Bearer from-env"},
            )
            assert w.status_code == 201
            t = c.post(
                "/v1/search", json={"collection": "plain", "text": "over the wire", "target": "text", "k": 1}
            )
            assert t.json()["hits"][0]["id"] == w.json()["ids"][0]
            assert "alignfuse_http_requests_total" in c.get("/metrics").text
            assert c.get("/").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        pump.join(5)
        assert "Application shutdown complete" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_help() -> None:
    from typer.testing import CliRunner

    from alignfuse.service.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"])
    assert out.exit_code == 0, out.output
    for opt in ("--host", "--port", "--collections", "--model", "--reranker"):
        assert opt in out.output


def test_serve_without_any_model_fails_fast(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from alignfuse.errors import InvalidInputError
    from alignfuse.service.cli import app

    out = CliRunner().invoke(app, ["serve", "--collections", str(tmp_path), "--port", "0"])
    assert isinstance(out.exception, InvalidInputError)
    assert "no dual encoder" in out.exception.message
