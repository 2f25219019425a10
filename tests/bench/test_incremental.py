"""bench/incremental.py end to end at toy size: the JSON's structure and sanity (never its timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "incremental.py"


@pytest.mark.slow  # ~15 s of CPU, but minutes of wall time on the shared 2-core machine
def test_incremental_toy_end_to_end(tmp_path: Path) -> None:
    out, png = tmp_path / "incremental.json", tmp_path / "incremental.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--toy",
        "--out",
        str(out),
        "--plot",
        str(png),
        "--workdir",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert png.is_file() and png.stat().st_size > 0
    for key in ("date", "git_commit", "machine", "loadavg_before", "loadavg_after"):
        assert key in r
    sizes, adds = r["args"]["sizes"], r["args"]["adds"]
    for part in ("vectors", "encoder"):
        rows = r[part]["rows"]
        assert sorted((row["n"], row["m"]) for row in rows) == sorted((n, m) for n in sizes for m in adds)
        for row in rows:
            assert row["add_s"] > 0 and row["rebuild_s"] > 0 and row["rebuild"]
        assert set(r[part]["add_s_ratio_largest_over_smallest_n"]) == {str(m) for m in adds}
    # the encoder ran on the added scenes: about M items (an image + its captions per scene) each time
    for row in r["encoder"]["rows"]:
        assert 0.5 * row["m"] <= row["items_added"] <= 2 * row["m"]
    assert r["encoder"]["model"] == "alignfuse:scenes-albef"
    assert any(row["rebuild"] == "measured" for row in r["encoder"]["rows"])
    assert not list(tmp_path.glob("af-inc-*"))  # scratch removed
