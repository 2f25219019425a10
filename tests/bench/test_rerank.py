"""bench/rerank.py and bench/rerank_storage.py end to end at toy size (the JSON's structure and the logit parity
with ALBEF's loop, never timings), and the reusable ``measure_rerank`` / ``direction_fns``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(script: str, *args: str) -> None:
    p = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    d = tmp_path_factory.mktemp("rerank")
    _run("rerank.py", "--quick", "--out", str(d / "rerank.json"), "--plot", str(d / "rerank.png"))
    return json.loads((d / "rerank.json").read_text()), d


def test_quick_run_rows_parity_and_plot(quick: tuple[dict, Path]) -> None:
    res, d = quick
    assert (d / "rerank.png").stat().st_size > 0 and res["complete"] is True
    assert (
        "ALBEF" in res["reference"]
        and res["machine"]["loadavg_start"]
        and res["machine"]["git_commit"] is not None
    )
    rows = res["results"]
    assert {(r["direction"], r["candidates"]) for r in rows} == {
        (d_, c) for d_ in ("t2i", "i2t") for c in (4, 8)
    }
    for r in rows:
        fns = ["ours", "ours_kv", "ours_kv_incl_build"] + (
            ["per_pair", "ours_serving"] if r["direction"] == "t2i" else []
        )
        for k in ["albef_loop", *fns]:
            assert r[f"{k}_s"] > 0 and r[f"{k}_pairs_per_s"] == pytest.approx(r["candidates"] / r[f"{k}_s"])
        for k in fns:
            assert r[f"speedup_{k}"] == pytest.approx(r["albef_loop_s"] / r[f"{k}_s"])
        # every path scores the same pairs as ALBEF's loop (fp32: float rounding only)
        run = {
            "t2i": {"per_pair", "ours", "ours_serving", "ours_kv"},
            "i2t": {"ours", "ours_kv", "ours_kv_incl_build"},
        }
        diffs = {
            k.removeprefix("max_abs_logit_diff_"): v for k, v in r.items() if k.startswith("max_abs_logit")
        }
        assert set(diffs) == run[r["direction"]] and max(diffs.values()) < 1e-4
        assert (r["text_layers_s"] is None) == (r["direction"] == "t2i")
        if r["direction"] == "t2i":  # the K/V of C images built per query is part of the incl.-build time
            assert r["ours_kv_incl_build_s"] == pytest.approx(r["ours_kv_s"] + r["kv_build_s"])
    # no absolute path of this machine in the committed JSON
    assert str(REPO) not in json.dumps(res)


def test_reference_is_albef_loop_and_breaks_on_wrong_weights() -> None:
    rr = _module("rerank")
    cfg = rr.CONFIGS["tiny"]
    model = rr._model(cfg, torch.device("cpu"), torch.float32)
    ref = rr.build_reference(model)
    x = rr.make_inputs(cfg, 5, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        for direction in rr.DIRECTIONS:
            fns, kv = rr.direction_fns(model, ref, x, direction)
            outs = {k: fn() for k, fn in fns.items()}
            assert all(o.shape == (5, 2) for o in outs.values())
            for k, o in outs.items():
                torch.testing.assert_close(o, outs["albef_loop"], atol=1e-4, rtol=1e-4, msg=k)
        # a perturbed fusion weight in ours (not in the reference) must show up as a logit difference
        model.text_encoder.fusion_layers[0].crossattention.self.key.weight.data.add_(0.5)
        fns, _ = rr.direction_fns(model, ref, x, "t2i")
        assert (fns["ours"]() - fns["albef_loop"]()).abs().max() > 1e-3


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("kv_cache", [False, True])
def test_measure_rerank(direction: str, kv_cache: bool) -> None:
    rr = _module("rerank")
    pps = rr.measure_rerank("tiny", 4, "cpu", torch.float32, kv_cache, direction=direction, repeats=1)
    assert isinstance(pps, float) and pps > 0


def test_storage_quick(tmp_path: Path) -> None:
    _run("rerank_storage.py", "--quick", "--out", str(tmp_path / "s.json"))
    res = json.loads((tmp_path / "s.json").read_text())["results"]
    cfg = _module("rerank").CONFIGS["tiny"]
    per = cfg.num_image_tokens * cfg.vision_width * 2
    assert (
        res["bytes_per_image_fp16"] == per
        and res["bytes_1M"] == per * 10**6
        and res["bytes_100M"] == per * 10**8
    )
    assert res["recompute_cpu_s_per_image"] > 0 and res["recompute_gpu_s_per_image_estimate"] > 0
    assert "ESTIMATE" in res["recompute_gpu_estimate"] and "--rerank-cache" in res["setting"]
    assert [q["candidates"] for q in res["per_query"]] == [4, 8]
    for q in res["per_query"]:
        assert q["stored_bytes_read"] == q["candidates"] * per
        assert q["recompute_cpu_s"] == pytest.approx(q["candidates"] * res["recompute_cpu_s_per_image"])


def test_vit_flops_base_matches_the_published_count() -> None:
    storage = _module("rerank_storage")
    # ViT-B/16 at 384 px: ~55.5 GMACs (timm / the ViT paper's table), i.e. ~111 GFLOPs
    assert storage.vit_flops(_module("rerank").CONFIGS["base"]) / 1e9 == pytest.approx(111, rel=0.05)
