"""bench/ann.py end to end at toy size (structure and sanity of its JSON, never its timings), and its reusable
data/recall helpers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.bench._toy import run_toy

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "ann.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ann", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_clustered_vectors_are_unit_clustered_and_reproducible() -> None:
    ann = _module()
    x = ann.clustered_vectors(3000, 64, seed=1, centres=16)
    assert x.shape == (3000, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(x, ann.clustered_vectors(3000, 64, seed=1, centres=16))
    # clustered: a point's nearest neighbour is far closer than a random pair (uniform data would not be)
    sims = x[:200] @ x.T
    sims[np.arange(200), np.arange(200)] = -1
    assert sims.max(axis=1).mean() > 0.6 > abs(float(sims.mean())) + 0.3
    # queries (another seed) come from the same mixture: close to the items, not identical
    q = ann.clustered_vectors(50, 64, seed=2, centres=16)
    assert (q @ x.T).max(axis=1).mean() > 0.6
    blocks = list(ann.iter_clustered(3000, 64, seed=1, centres=16, block=1000))
    assert [len(b) for b in blocks] == [1000, 1000, 1000]


def test_recall_at_k() -> None:
    ann = _module()
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert ann.recall_at_k(truth, truth, 3) == 1.0
    assert ann.recall_at_k(np.array([[3, 9, -1], [6, 5, 4]]), truth, 3) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        ann.recall_at_k(truth[:1], truth, 3)


def test_exact_top_k_blockwise_matches_brute_force() -> None:
    ann = _module()
    x = ann.clustered_vectors(2500, 32, seed=3, centres=8)
    q = ann.clustered_vectors(20, 32, seed=4, centres=8)
    got = ann.exact_top_k(iter(np.array_split(x, 4)), q, 10)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert ann.recall_at_k(got, want, 10) > 0.99


@pytest.mark.slow  # ~15 s of CPU, minutes of wall time on the shared 2-core machine
def test_ann_toy_end_to_end(tmp_path: Path) -> None:
    r = run_toy("ann", tmp_path, timeout=600)
    assert r["machine"]["faiss"] and r["machine"]["cpu_count"]
    assert "/" not in json.dumps(r["args"])  # relative paths only (no workdir leaks into the JSON)
    (run,) = r["runs"]
    assert set(run["cells"]) >= {"Flat", "HNSW", "IVF-Flat", "IVF-PQ+refine"}
    for name, cell in run["cells"].items():
        b = cell["build"]
        assert b["segments"] == 1
        if b["built_by"] == "import":  # the first cell; the others re-derive its index by compaction
            assert b["added"] == run["n"] and b["ids_match_rows"]
        else:
            assert b["built_by"] == "compact" and b["compact_s"] > 0
        if cell["requested_key"] != "auto":
            assert b["index_keys"] == [cell["requested_key"]], name  # built what was asked, not a fallback
        assert b["peak_rss_mb"] > 0 and b["disk_mb"]["faiss"] > 0
        for s in (cell["search"], cell["search_mmap"]):
            assert s["qps_b1"] > 0 and s["qps_b64"] > 0 and s["open_s"] >= 0
            assert 0.0 <= s["recall_at_10"] <= 1.0
    # Flat through the collection layer is exact: the ground truth and the id mapping agree
    assert run["cells"]["Flat"]["search"]["recall_at_10"] == 1.0
    assert run["cells"]["HNSW"]["search_mmap"]["sweep"]  # the recipe's neighbourhood was swept
    assert run["auto_key"] == "Flat" and run["auto_same_as"] == "Flat"
    assert set(run["target"]) >= {"auto_recall_at_10", "auto_speedup_vs_flat_b1", "met"}
    seg = r["segments"]
    assert seg["build"]["segments"] == seg["compact"]["segments_before"] > 1
    # the default merge policy bounds what the same adds leave behind
    assert seg["with_merge_policy"]["build"]["segments"] <= seg["build"]["segments"]
    assert seg["compact"]["segments_after"] == 1
    assert seg["many_segments"]["recall_at_10"] == seg["one_segment"]["recall_at_10"] == 1.0
    assert not list(tmp_path.glob("af-ann-*"))  # scratch removed
