"""bench/gpu.py end to end at toy sizes on the CPU (the GPU benchmark's every branch but the CUDA calls), its
time budget, and the pieces its ceilings rest on (roofline, FLOP counting with attention included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"
sys.path.insert(0, str(ROOT / "bench"))

from gpu_common import Budget, Ceiling, count_flops  # noqa: E402

from alignfuse.index.ann import effective_index_key  # noqa: E402
from alignfuse.index.options import IndexOptions, choose_index_key  # noqa: E402
from alignfuse.models.albef.config import get_albef_config  # noqa: E402
from alignfuse.models.albef.model import build_visual_encoder  # noqa: E402


def run(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu-toy.json"
    p = run("--toy", "--out", str(out), "--threads", "1", "--faiss-fake-gpu")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "the installed faiss has no GPU" in p.stdout  # said clearly, not silently skipped
    text = out.read_text()
    assert str(out.parent) not in text and str(ROOT) not in text  # relative paths only
    return json.loads(text)


def test_toy_run_records_machine_and_budget(toy: dict) -> None:
    assert toy["status"] == "complete" and toy["errors"] == {}
    assert toy["toy"] is True and toy["device"] == "cpu" and toy["card"] is None
    assert set(toy["load"]) == {"start", "end"} and len(toy["load"]["start"]) == 3
    assert toy["machine"]["versions"]["torch"] == torch.__version__
    assert toy["date_utc"].startswith("20")
    b = toy["budget"]
    assert b["skipped"] == [] and 0 < b["elapsed_s"] < b["total_s"]
    cpu = toy["ceilings"]["cpu"]
    assert cpu["matmul_flops"]["fp32"] > 1e8 and cpu["matmul_flops"]["bf16"] > 1e7
    assert cpu["copy_bytes_per_s"] > 1e8


def test_toy_vit_and_rerank_rows_against_ceiling(toy: dict) -> None:
    vit = toy["sections"]["vit"]
    assert [(r["dtype"], r["batch"]) for r in vit["rows"]] == [("fp32", 4), ("bf16", 4)]
    for r in vit["rows"]:
        assert r["images_per_s"] > 0 and r["ceiling_images_per_s"] > 0
        assert r["ceiling_ratio"] == pytest.approx(r["images_per_s"] / r["ceiling_images_per_s"])
    assert "aten.bmm" in vit["flop_ops"]  # attention counted
    rer = toy["sections"]["rerank"]
    assert {(r["dtype"], r["kv_cache"]) for r in rer["rows"]} == {
        ("fp32", False),
        ("fp32", True),
        ("bf16", False),
        ("bf16", True),
    }
    f = rer["flops"]["8"]
    assert 0 < f["kv"] < f["no_kv"] and f["kv_build"] > 0  # the cache removes the K/V projections
    for r in rer["rows"]:
        # consistent, not bounded by 1: at toy sizes on a CPU the ceiling (a large matmul's measured rate) is not
        # one; bf16 matmuls without native bf16 units run slower than the small ops a toy rerank is made of
        assert r["pairs_per_s"] > 0 and r["ceiling_pairs_per_s"] > 0
        assert r["ceiling_ratio"] == pytest.approx(r["pairs_per_s"] / r["ceiling_pairs_per_s"])
    ref = toy["sections"]["rerank_vs_albef"]["rows"]
    assert {r["direction"] for r in ref} == {"t2i", "i2t"}
    assert all(r["albef_loop_pairs_per_s"] > 0 and r["max_abs_logit_diff_ours"] < 0.1 for r in ref)


def test_toy_faiss_every_engine_and_the_auto_choice(toy: dict) -> None:
    fa = toy["sections"]["faiss"]
    assert fa["faiss_num_gpus"] == 0 and "no GPU" in fa["note"]
    assert fa["ground_truth"] == "faiss CPU Flat"
    # the full run's key (asked about 1M vectors), built on the toy vectors (Flat if they are too few to train)
    chosen = choose_index_key(1_000_000, 32, IndexOptions().memory_budget_bytes)
    built = effective_index_key(chosen, 4000, 32)
    assert (fa["auto"]["chosen_key"], fa["auto"]["built_key"]) == (chosen, built)
    rows = {r["engine"]: r for r in fa["rows"]}
    assert set(rows) == {
        "faiss Flat",
        "faiss-gpu Flat (fake: CPU objects)",
        "torch matmul+topk Flat (stand-in)",
        f"faiss {built} (auto choice)",
    }
    for name, r in rows.items():
        assert r["qps_b1"] > 0 and r["qps_b64"] > 0, name
        assert r["recall_at_10"] >= (0.99 if "Flat" in name else 0.8), name
    for name in ("faiss Flat", "faiss-gpu Flat (fake: CPU objects)", "torch matmul+topk Flat (stand-in)"):
        r = rows[name]
        assert r["flops_per_query"] == 2 * 4000 * 32 and r["distances_per_query"] == 4000
        assert r["ceiling_qps_b1"] > 0 and r["ceiling_ratio_b64"] > 0
    auto = rows[f"faiss {built} (auto choice)"]
    assert auto["build_s"] > 0
    if "HNSW" in built or "IVF" in built:  # FAISS's own distance counters
        assert 0 < auto["distances_per_query"] < 4000
        assert auto["search_params"]["type"].startswith(("SearchParameters", "IndexRefine"))


def test_without_faiss_the_torch_stand_in_still_runs(tmp_path: Path) -> None:
    """What a GPU machine without faiss (no registry to install it from) gets: the exact search on the
    device through torch, and a clear note."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoFaiss:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'faiss':\n"
        "            raise ImportError('faiss hidden by the test')\n"
        "sys.meta_path.insert(0, _NoFaiss())\n"
    )
    out = tmp_path / "g.json"
    p = run("--toy", "--out", str(out), "--sections", "faiss", env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    fa = json.loads(out.read_text())["sections"]["faiss"]
    assert "faiss is not importable" in fa["note"] and "faiss_version" not in fa
    assert [r["engine"] for r in fa["rows"]] == ["torch matmul+topk Flat (stand-in)"]
    assert fa["rows"][0]["qps_b64"] > 0 and fa["rows"][0]["recall_at_10"] == 1.0


def test_budget_skips_and_records_every_section(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    p = run("--toy", "--out", str(out), "--budget-s", "1", "--sections", "vit,rerank,faiss")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["status"] == "complete"
    what = " ".join(s["what"] for s in res["budget"]["skipped"])
    assert "vit" in what and "rerank" in what and "faiss" in what
    assert res["sections"]["vit"]["rows"] == [] and res["sections"]["rerank"]["rows"] == []
    assert "[skipped]" in p.stdout


def test_no_cuda_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = run("--sections", "vit", timeout=120)
    assert p.returncode == 2 and "sees no CUDA device" in p.stderr


def test_budget_and_roofline() -> None:
    b = Budget(total_s=100.0, start=0.0)  # started long ago: nothing fits
    assert not b.allow("x", 1.0) and b.skipped[0]["what"] == "x"
    c = Ceiling("cpu", {"fp32": 1e12}, copy_bytes_per_s=1e11)
    assert c.items_per_s(1e9, "fp32") == pytest.approx(1000.0)  # compute-bound
    assert c.items_per_s(1e3, "fp32", bytes_moved=1e9) == pytest.approx(100.0)  # memory-bound


def test_flop_count_matches_vit_formula() -> None:
    """The counter sees every matmul, attention included, on the CPU too (math backend)."""
    cfg = get_albef_config("tiny")
    vit = build_visual_encoder(cfg).eval()
    r = cfg.image_res
    flops, ops = count_flops(lambda: vit.forward_features(torch.zeros(1, 3, r, r)))
    n, w = cfg.num_image_tokens, cfg.vision_width
    patch = 2 * cfg.num_patches * 3 * cfg.patch_size**2 * w
    layer = 2 * n * w * (4 * w + 2 * int(cfg.mlp_ratio * w)) + 4 * n * n * w
    assert flops == pytest.approx(patch + cfg.vision_depth * layer, rel=0.01)
