"""bench/peers.py end to end at toy size: the alignfuse side always runs; a peer side runs when its venv exists
(scripts/peers-venv.sh) and is otherwise recorded as skipped with the reason. Checks the JSON's structure and
sanity, never its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench._peers.common import peer  # noqa: E402

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, peers_dir: Path | None) -> dict:  # type: ignore[type-arg]
    out, png = tmp_path / "peers.json", tmp_path / "peers.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if peers_dir is not None:
        env["ALIGNFUSE_PEERS_DIR"] = str(peers_dir)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peers.py"), "--toy", "--threads", "1", "--workers", "0",
         "--out", str(out), "--plot", str(png), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert png.is_file() and png.stat().st_size > 1000
    data = json.loads(out.read_text())
    # relative paths only: no absolute path of this machine leaks into the JSON
    assert str(tmp_path) not in out.read_text() and "/work/" not in out.read_text()
    return data


def _check_alignfuse(data: dict) -> None:  # type: ignore[type-arg]
    assert data["benchmark"] == "peers" and data["toy"] is True
    for key in ("cpus", "cpu_model", "platform", "python", "torch", "faiss", "loadavg_start", "loadavg_end"):
        assert key in data["machine"]
    assert data["date"].endswith("Z") and data["config"]["alignfuse_runtime"]
    af_builds = [c for c in data["build"]["cells"] if c["system"] == "alignfuse"]
    assert af_builds and all(c["rc"] == 0 and c["images"] == data["images"]["count"] for c in af_builds)
    assert all(c["images_per_s"] > 0 and len(c["loadavg_before"]) == 3 for c in af_builds)
    af_search = [c for c in data["search"]["cells"] if c["system"] == "alignfuse"]
    assert sorted({c["concurrency"] for c in af_search}) == data["config"]["concurrency"]
    for c in af_search:
        assert c["errors"] == 0 and c["requests"] > 0 and c["p50_ms"] <= c["p99_ms"]
        assert c["status_codes"] == {"200": c["requests"]}
    af_embed = [c for c in data["embed"]["cells"] if c["system"] == "alignfuse"]
    assert af_embed and all(c["images_per_s"] > 0 and c["texts_per_s"] > 0 for c in af_embed)
    rows = data["summary"]["search"]["by_concurrency"]
    assert [r["concurrency"] for r in rows] == data["config"]["concurrency"]
    assert all(r["alignfuse_rps"] > 0 for r in rows)


def _check_peer(data: dict, name: str, installed: bool) -> None:  # type: ignore[type-arg]
    info = data["peers"][name]
    assert info["installed"] is installed
    systems = {c["system"] for section in ("build", "search", "embed") for c in data[section]["cells"]}
    summ = data["summary"]
    if not installed:
        assert "venv not found" in info["skipped"] and name not in systems
        if name == "clip-retrieval":
            assert summ["build"]["target_met"] is None and summ["search"]["target_met"] is None
        else:
            assert summ["embed"]["infinity_images_per_s"] is None
        return
    assert info["version"] and "skipped" not in info
    if name == "clip-retrieval":
        cells = [c for c in data["build"]["cells"] if c["system"] == name]
        assert cells and all("error" not in c and c["images"] == data["images"]["count"] for c in cells)
        assert summ["build"]["ratio_alignfuse_over_clip_retrieval"] > 0
        search = [c for c in data["search"]["cells"] if c["system"] == name]
        assert search and all(c["errors"] == 0 and c["requests"] > 0 for c in search)
        assert isinstance(summ["search"]["target_met"], bool)
    else:
        cells = [c for c in data["embed"]["cells"] if c["system"] == name]
        assert cells and all(c["images_per_s"] > 0 and c["texts_per_s"] > 0 for c in cells)
        assert cells[0]["check"] == {"text_dim": 512, "image_dim": 512}


def test_peers_toy_with_whatever_is_installed(tmp_path: Path) -> None:
    """The default peers folder: peers run where scripts/peers-venv.sh installed them (skipped elsewhere)."""
    data = _run(tmp_path, None)
    _check_alignfuse(data)
    for name in ("clip-retrieval", "infinity"):
        _check_peer(data, name, peer(name).installed)


def test_peers_toy_records_missing_peers_as_skipped(tmp_path: Path) -> None:
    """An empty peers folder (as on CI): only alignfuse runs, and the JSON says why each peer was skipped."""
    data = _run(tmp_path, tmp_path / "no-peers")
    _check_alignfuse(data)
    for name in ("clip-retrieval", "infinity"):
        _check_peer(data, name, False)
