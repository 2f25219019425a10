"""bench/eval_scenes.py end to end at toy size: the JSON's structure, ALBEF's numbers next to truth-aware
recall (never below them), and the report table (never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "eval_scenes.py"
RECALL = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")


@pytest.mark.slow  # ~100 s at load 17 on 2 cores (real models: dual, rerank, all pairs)
def test_toy_split_and_report(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "eval_scenes_test.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--split",
        "test",
        "--toy",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("date_utc", "git_commit", "weights_sha256", "platform", "versions", "loadavg", "loadavg_end"):
        assert key in res, key
    assert res["split"] == "test" and res["seed"] == 3 and res["build"]["items"] == 40 * 6
    for scope, modes, n_images in (
        ("full", ("dual", "rerank"), 40),
        ("all_pairs_subset", ("dual", "rerank", "all_pairs"), 10),
    ):
        block = res[scope]
        assert block["meta"]["n_images"] == n_images
        for mode in modes:
            m = block[mode]
            for key in RECALL:
                assert 0 <= m[key] <= m[f"{key}_true"] <= 100, (scope, mode, key)
            assert 0 <= m["group_acc_t2i"] <= 1
    report = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Truth-aware recall" in report.stdout and "| test | 40×200 | rerank |" in report.stdout
    assert (tmp_path / "eval_scenes.png").stat().st_size > 0
