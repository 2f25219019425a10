"""bench/perception.py end to end at toy size (structure and sanity of its JSON, never its timings), and its
scoring on a constructed gallery where every number is known."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest

from alignfuse.data.scenes import SceneObject, caption_matches, shows

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "perception.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_perception", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _obj(shape: str, colour: str, x: float) -> dict:
    return asdict(SceneObject(shape, colour, "small", x, 0.5, 0.14))


GALLERY = {
    "a.png": (_obj("circle", "red", 0.2), _obj("square", "blue", 0.8)),
    "b.png": (_obj("circle", "red", 0.2), _obj("circle", "red", 0.8)),  # two red circles
    "c.png": (_obj("circle", "blue", 0.5),),
    "d.png": (_obj("star", "red", 0.5),),
    "e.png": (_obj("star", "green", 0.5),),
}


def test_scoring_on_a_constructed_gallery_is_exact() -> None:
    p = _module()
    queries = {q.text: q for q in p.gallery_queries(GALLERY)}
    assert set(queries) == {
        "a red circle", "a blue square", "a blue circle", "a red star", "a green star",
        "a circle", "a square", "a star",
    }  # fmt: skip
    assert queries["a red circle"].present == 2 and queries["a circle"].present == 3
    red = queries["a red circle"]
    order = ["d.png", "b.png", "c.png", "a.png", "e.png"]
    got = p.score_order(red, order, GALLERY, 4)
    # top 4: d (red star), b (two red circles), c (blue circle), a (red circle + blue square)
    assert got["p"] == pytest.approx(2 / 4)  # b and a show a red circle
    assert got["p_exact"] == pytest.approx(1 / 4)  # b has two: false under the exact reading
    assert got["colour"] == pytest.approx(3 / 4) and got["shape"] == pytest.approx(3 / 4)
    assert got["first_true"] == 2 and got["top"] == order[:4]
    circle = p.score_order(queries["a circle"], order, GALLERY, 5)
    assert circle["p"] == pytest.approx(3 / 5) and circle["colour"] is None
    rows = [
        {"kind": "colour_shape", "present": 12, "dual": {**got, "p": 0.2}, "rerank": {**got, "p": 1.0}},
        {"kind": "colour_shape", "present": 2, "dual": {**got, "p": 0.4}, "rerank": {**got, "p": 0.8}},
    ]
    both, common = p.aggregate(rows, "colour_shape", 1), p.aggregate(rows, "colour_shape", 10)
    assert (
        both["queries"] == 2
        and both["dual_p"] == pytest.approx(0.3)
        and both["rerank_p"] == pytest.approx(0.9)
    )
    assert both["rerank_meets_target"] and not both["dual_meets_target"]
    assert common["queries"] == 1 and common["dual_p"] == pytest.approx(0.2)


@pytest.mark.slow  # ~100 s at load 17 on 2 cores (two real models, two protocol splits)
def test_toy_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "perception.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--toy",
        "--pipelines",
        "albef",
        "--out",
        str(out),
        "--data",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "| albef | 8 |" in proc.stdout
    for key in (
        "date_utc",
        "git_commit",
        "machine",
        "versions",
        "loadavg_start",
        "loadavg_end",
        "weights_sha256",
    ):
        assert key in res, key
    assert set(res["weights_sha256"]) >= {"scenes-albef.safetensors", "scenes-clip.safetensors"}
    assert res["gallery"] == {"split": "test", "seed": 3, "count": 60}
    assert f"{REPO}{os.sep}" not in out.read_text()  # relative paths only
    pipe = res["pipelines"]["albef"]
    assert pipe["dual"] == pipe["reranker"] == "alignfuse:scenes-albef" and pipe["collection_items"] == 360
    block = pipe["by_candidates"]["8"]
    assert block["fusion"] in ("itm", "itm+itc", "itm+itc_logit")
    # recompute every row's precision from its own top 5 and the gallery's truth (the scenes JSON)
    scenes = json.loads((tmp_path / "scenes-test-seed3-n60" / "scenes.json").read_text())
    gallery = {Path(e["image"]).name: e["objects"] for e in scenes}
    kinds = {r["kind"] for r in block["queries"]}
    assert kinds == {"colour_shape", "shape"}
    for row in block["queries"]:
        colour, shape = (
            (None, row["query"].split()[-1]) if row["kind"] == "shape" else row["query"].split()[1:]
        )
        assert row["present"] == sum(shows(o, colour, shape) for o in gallery.values()) >= 1
        for side in ("dual", "rerank"):
            r = row[side]
            assert len(r["top"]) == 5 and len(set(r["top"])) == 5
            assert r["p"] == pytest.approx(sum(shows(gallery[k], colour, shape) for k in r["top"]) / 5)
            exact = sum(caption_matches(row["query"], gallery[k]) for k in r["top"]) / 5
            assert r["p_exact"] == pytest.approx(exact) and 0 <= r["p_exact"] <= r["p"] <= 1
            assert r["p"] <= r["shape"] <= 1 and (r["colour"] is None or r["p"] <= r["colour"] <= 1)
    s = block["summary"]
    assert set(s) == {"colour_shape_min1", "colour_shape_min10", "shape_min1", "shape_min10"}
    assert s["colour_shape_min1"]["queries"] == sum(r["kind"] == "colour_shape" for r in block["queries"])
    assert s["colour_shape_min10"]["queries"] <= s["colour_shape_min1"]["queries"]
    # the protocol on both splits: truth-aware recall never below ALBEF's, group accuracy in [0, 1]
    proto = pipe["protocol"]
    for split in ("test", "compositional"):
        for mode in ("dual", "rerank"):
            m = proto[split][mode]
            for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"):
                assert 0 <= m[key] <= m[f"{key}_true"] <= 100, (split, mode, key)
            assert 0 <= m["group_acc_t2i"] <= 1
        assert proto[split]["rerank_gain_ir_r1"] == pytest.approx(
            proto[split]["rerank"]["ir_r1"] - proto[split]["dual"]["ir_r1"], abs=0.011
        )


def test_help_and_bad_arguments() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--candidates" in ok.stdout
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--dual", "alignfuse:scenes-clip"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "--reranker" in bad.stderr
