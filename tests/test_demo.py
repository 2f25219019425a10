"""`make demo` end to end: a real process builds the demo collection with the shipped models and serves it;
the test queries the real server over HTTP, then stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "weights" / "scenes-albef.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shipped scenes-albef weights not present")
def test_make_demo_serves_a_query(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = f"--data {tmp_path / 'demo'} --count 40 --port {port} --examples 2"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "demo", f"DEMO_ARGS={args}"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert ready, f"demo server never became ready:\n{log.read_text()[-3000:]}"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/search",
            json={"collection": "scenes", "text": "a red circle", "k": 5},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["hits"]) == 5
        assert body["pairs_scored"] > 0  # the reranker ran
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        text = log.read_text()
        assert "serving http://127.0.0.1:" in text
        assert "ITM rerank moved" in text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # a second run reuses what the first built (resume by content hash): nothing is re-encoded
    out2 = subprocess.run(
        [
            str(ROOT / ".venv/bin/alignfuse"),
            "demo",
            "--data",
            str(tmp_path / "demo"),
            "--count",
            "40",
            "--no-serve",
            "--examples",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out2.returncode == 0, out2.stderr
    assert "0 items added" in out2.stderr


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shipped scenes-albef weights not present")
def test_demo_rebuilds_a_collection_built_by_other_weights(tmp_path: Path) -> None:
    """After an upgrade of the shipped weights the old demo collection no longer matches: the demo moves it
    aside, rebuilds it, and serves the new one (a real run of the CLI, no server)."""
    from alignfuse.data.scenes import generate_scenes
    from alignfuse.index import BuildOptions, build_collection, open_collection, open_source
    from alignfuse.models.registry import create_dual_encoder

    data = tmp_path / "demo"
    scenes = data / "scenes-test-seed3-n12"
    generate_scenes(scenes, seed=3, count=12, split="test")
    old = create_dual_encoder("alignfuse:random-tiny")
    build_collection(
        data / "collections" / "scenes",
        open_source(karpathy=scenes / "scenes.json", image_root=scenes),
        old,
        options=BuildOptions(progress=False),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(ROOT / ".venv/bin/alignfuse"), "demo", "--data", str(data), "--count", "12"]
    out = subprocess.run(
        [*cmd, "--no-serve", "--examples", "0"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "rebuilding the demo collection" in out.stderr
    coll = open_collection(data / "collections" / "scenes")
    assert coll.manifest.encoder.spec == "alignfuse:scenes-albef"
    assert coll.count() == 12 + 60  # 12 images and their 5 captions each
    assert not (data / "collections" / ".scenes.stale").exists()
