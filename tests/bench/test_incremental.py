"""bench/incremental.py end to end at toy size: the JSON's structure and sanity (never its timings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench._toy import run_toy


@pytest.mark.slow  # ~15 s of CPU, but minutes of wall time on the shared 2-core machine
def test_incremental_toy_end_to_end(tmp_path: Path) -> None:
    r = run_toy("incremental", tmp_path, timeout=900)
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
