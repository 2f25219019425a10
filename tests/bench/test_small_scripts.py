"""The older benchmark scripts without a ``--toy`` flag (build, service, vilt_cost, ray_build) run end to end at
tiny sizes through their own flags, into ``tmp_path``: each writes its JSON and plot, and the JSON holds one
measured cell per configuration asked for. Timings are not checked (benchmarks, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, tmp_path: Path, *args: str, timeout: int = 600) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), *args, "--out", str(out)]
    p = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path, check=False
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert "machine" in result
    return result


@pytest.mark.slow
def test_build_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    r = run_script(
        "build",
        tmp_path,
        *("--model", "alignfuse:random-tiny", "--images", "12", "--batch-size", "4", "--workers", "0,1"),
        *("--threads", "1"),
    )
    assert [b["workers"] for b in r["builds"]] == [0, 1]
    assert all(b["images"] == 12 and b["failed"] == 0 and b["images_per_s"] > 0 for b in r["builds"])
    assert (tmp_path / "build.png").stat().st_size > 0


@pytest.mark.slow
def test_service_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    r = run_script(
        "service",
        tmp_path,
        *("--model", "alignfuse:random-tiny", "--reranker", "albef:tiny", "--scenes", "12"),
        *("--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.2", "--candidates", "4", "--k", "3"),
    )
    cells = r["cells"]
    assert {c["concurrency"] for c in cells} == {1, 4}
    assert {(c["batching"], c["rerank"]) for c in cells} >= {(True, False), (True, True)}
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in cells)
    assert "rerank_off" in r["summary"]
    assert (tmp_path / "service.png").stat().st_size > 0


@pytest.mark.slow
def test_vilt_cost_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    r = run_script("vilt_cost", tmp_path, "--sizes", "tiny", "--tiny-candidates", "4", "--repeats", "1")
    models = {row["model"] for row in r["results"]}
    assert {"vilt", "albef"} <= models
    assert all(
        row["size"] == "tiny" and row["candidates"] == 4 and row["pairs_per_s"] > 0 for row in r["results"]
    )


@pytest.mark.slow
def test_ray_build_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    r = run_script(
        "ray_build",
        tmp_path,
        *("--compute-model", "alignfuse:random-tiny", "--compute-images", "8"),
        *("--small-model", "alignfuse:random-tiny", "--small-sizes", "12,24", "--batch-size", "4"),
    )
    for part in ("compute", "small"):
        engines = {run["engine"] for run in r[part]["runs"]}
        assert engines == {"local", "ray"}
        assert all(run["images_per_s"] > 0 for run in r[part]["runs"])
    assert (tmp_path / "ray_build.png").stat().st_size > 0
