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
        # the second pipeline: CLIP → ALBEF ITM, over the same scenes; the listing names each encoder
        listing = httpx.get(f"http://127.0.0.1:{port}/v1/collections", timeout=10).json()
        encoders = {c["name"]: (c["dual_encoder"], c["compatible"]) for c in listing["collections"]}
        assert encoders == {
            "scenes": ("alignfuse:scenes-albef", True),
            "scenes-clip": ("alignfuse:scenes-clip", True),
        }
        assert sorted(listing["models"]["dual_encoders"]) == [
            "alignfuse:scenes-albef",
            "alignfuse:scenes-clip",
        ]
        assert listing["models"]["reranker"] == "alignfuse:scenes-albef"
        r2 = httpx.post(
            f"http://127.0.0.1:{port}/v1/search",
            json={"collection": "scenes-clip", "text": "a red circle", "k": 5, "include_itc": True},
            timeout=60,
        )
        assert r2.status_code == 200, r2.text
        assert r2.json()["pairs_scored"] > 0
        # different dual encoders: different ITC scores for the same query and images
        itc_albef = {h["uri"]: h["itc"] for h in body["hits"]}
        itc_clip = {h["uri"]: h["itc"] for h in r2.json()["hits"]}
        shared = set(itc_albef) & set(itc_clip)
        assert all(abs(itc_albef[u] - itc_clip[u]) > 1e-4 for u in shared)
        sugg = httpx.get(f"http://127.0.0.1:{port}/v1/collections/scenes/suggestions", timeout=10)
        assert sugg.status_code == 200 and all(s["n_true"] >= 1 for s in sugg.json()["suggestions"])
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


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shipped scenes-albef weights not present")
def test_demo_no_serve_measures_both_pipelines_truthfully(tmp_path: Path) -> None:
    """`alignfuse demo --no-serve`: two collections (ALBEF ITC → ALBEF ITM and CLIP → ALBEF ITM), a
    truth-aware summary of each, and suggested queries that are all true of at least one image of their
    collection (checked here against the drawn objects) and where the rerank helped."""
    import json
    import re

    from alignfuse.data.scenes import caption_matches
    from alignfuse.index import open_collection

    data = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            str(ROOT / ".venv/bin/alignfuse"),
            "demo",
            "--data",
            str(data),
            "--count",
            "60",
            "--probe",
            "20",
            "--examples",
            "3",
            "--no-serve",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # both pipelines, each with truth-aware R@1 / R@5 and how often the rerank moved the first true image
    assert "Truth-aware retrieval on 20 test captions" in text
    assert "scenes (alignfuse:scenes-albef → alignfuse:scenes-albef)" in text
    assert "scenes-clip (alignfuse:scenes-clip → alignfuse:scenes-albef)" in text
    recalls = re.findall(r"R@1 ([\d.]+) -> ([\d.]+), R@5 ([\d.]+) -> ([\d.]+)", text)
    assert len(recalls) == 2
    for r1d, r1r, r5d, r5r in recalls:
        assert 0 <= float(r1d) <= float(r5d) <= 100 and 0 <= float(r1r) <= float(r5r) <= 100
    moved = re.findall(
        r"the ITM rerank moved the first true image up for (\d+) captions and down for (\d+)", text
    )
    assert len(moved) == 2 and all(int(u) + int(d) <= 20 for u, d in moved)
    # no hard-coded suggestion list any more (it offered "two red circles", true of no image)
    assert "Also try:" not in text
    scenes = json.loads((data / "scenes-test-seed3-n60" / "scenes.json").read_text())
    objects = {Path(e["image"]).name: e["objects"] for e in scenes}
    for name, dual in (("scenes", "alignfuse:scenes-albef"), ("scenes-clip", "alignfuse:scenes-clip")):
        coll = open_collection(data / "collections" / name)
        assert coll.manifest.encoder.spec == dual
        coll.close()
        body = json.loads((data / "collections" / name / "suggestions.json").read_text())
        assert body["pipeline"] == {"dual_encoder": dual, "reranker": "alignfuse:scenes-albef"}
        for s in body["suggestions"]:
            true_here = [k for k, objs in objects.items() if caption_matches(s["text"], objs)]
            assert len(true_here) == s["n_true"] >= 1, s
            # the rerank helped: more true images in the top k, or the first one moved up
            assert s["precision_rerank"] > s["precision_dual"] or (
                s["precision_rerank"] == s["precision_dual"]
                and (s["first_true_dual"] or 10**6) > (s["first_true_rerank"] or 10**6)
            ), s
        printed = re.findall(rf"Suggested queries for {re.escape(name)}:.*?\n((?:  - .*\n)*)", text)
        assert printed, text
        for line in printed[0].splitlines():
            query = re.match(r"  - '(.*?)' \(", line)
            assert query and query.group(1) in {s["text"] for s in body["suggestions"]}
