"""Run a bench script with ``--toy`` into ``tmp_path`` and check what every bench JSON must hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_toy(name: str, tmp_path: Path, *, timeout: int) -> dict[str, Any]:
    """``bench/<name>.py --toy --out --plot --workdir`` in a subprocess; asserts success, a non-empty plot and the
    run's provenance keys; returns the JSON."""
    out, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = REPO / "bench" / f"{name}.py"
    cmd = [
        sys.executable,
        str(script),
        "--toy",
        "--out",
        str(out),
        "--plot",
        str(png),
        "--workdir",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    r: dict[str, Any] = json.loads(out.read_text())
    assert png.is_file() and png.stat().st_size > 0
    for key in ("date", "git_commit", "machine", "loadavg_before", "loadavg_after"):
        assert key in r
    return r
