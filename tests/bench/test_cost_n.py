"""bench/cost_n.py end to end at toy size with the shipped ALBEF (the JSON's structure and sanity, never
timings), and the behaviour behind its comparison: a rerank whose C covers the gallery is all pairs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "cost_n.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cost_n", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cost_n_data")


def test_quick_run(tmp_path: Path, data_dir: Path) -> None:
    out, png = tmp_path / "cost_n.json", tmp_path / "cost_n.png"
    p = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--plot",
            str(png),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert png.stat().st_size > 0
    res = json.loads(out.read_text())
    assert res["model"] == "alignfuse:scenes-albef" and res["model_id"] and res["split"] == "test"
    assert res["machine"]["loadavg_start"] and "loadavg_end" in res["machine"]
    assert not Path(res["data"]).is_absolute() or str(REPO) not in res["data"]
    assert [r["n"] for r in res["results"]] == [20, 40]
    for r in res["results"]:
        modes = r["modes"]
        assert set(modes) == {"dual", "rerank_4", "rerank_8", "all_pairs"}
        assert modes["dual"]["pair_evals_per_query"] == 0
        assert (
            modes["rerank_4"]["pair_evals_per_query"] == 4 and modes["rerank_8"]["pair_evals_per_query"] == 8
        )
        ap = modes["all_pairs"]
        assert ap["pair_evals_per_query"] == r["n"] and not ap["extrapolated"] and ap["queries_timed"] >= 1
        for m in modes.values():
            assert m["per_query_s_median"] > 0
            assert 0.0 <= m["r1_t2i"] <= 100.0
        # rerank time includes its dual stage
        assert modes["rerank_8"]["per_query_s_median"] >= modes["dual"]["per_query_s_median"]
    t = res["targets"]
    assert t["candidates"] == 8 and set(t["r1_within_1_point"]) == {"20", "40"}
    assert "two_stage_time_10k_over_1k" not in t  # only when both sizes were run


def test_rerank_covering_the_gallery_equals_all_pairs(data_dir: Path) -> None:
    import torch

    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    cn = _module()
    torch.set_num_threads(1)
    dual = create_dual_encoder("alignfuse:scenes-albef")
    cross = create_cross_encoder("alignfuse:scenes-albef")
    paths, captions = cn.gallery(data_dir, 12, seed=5)
    emb, tokens, _ = cn.encode_gallery(dual, cross, paths, batch=8)
    assert emb.shape[0] == tokens.shape[0] == 12 and tokens.dtype == torch.float16
    sc = cn.Scorer(dual, cross, emb, tokens)
    queries = np.arange(12)
    r = cn.run_n(sc, captions, 12, queries, [3, 12], ap_queries=12)
    m = r["modes"]
    assert m["rerank_12"]["r1_t2i"] == pytest.approx(m["all_pairs"]["r1_t2i"])
    assert m["rerank_12"]["r1_t2i_on_all_pairs_queries"] == pytest.approx(m["all_pairs"]["r1_t2i"])
    # the targets: an extrapolated all-pairs row is never used for the R@1 comparison
    fake = {"n": 10000, "modes": {"rerank_12": {**m["rerank_12"], "per_query_s_median": 1.0},
                                  "all_pairs": {"extrapolated": True, "r1_t2i": 0.0}}}  # fmt: skip
    t = cn.targets([fake], [12])
    assert (
        t["pair_passes_fewer_at_10k"]["value"] == pytest.approx(10000 / 12) and t["r1_within_1_point"] == {}
    )
