"""bench/cpu.py end to end at toy size (``--quick``: tiny ALBEF and CLIP): the JSON's structure and sanity,
never its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignfuse.models.base import cpu_has_native_bf16

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
# torch bf16 runs only where the CPU has native bf16; elsewhere the bench lists it as skipped
VARIANTS = {"torch-fp32", "onnx-fp32", "onnx-int8", "torch-int8"} | (
    {"torch-bf16"} if cpu_has_native_bf16() else set()
)


@pytest.mark.slow  # ~5 min on the loaded 2-core machine (tiny models, but 20 ONNX exports + imports)
@pytest.mark.timeout(900)
def test_cpu_bench_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "cpu.json", tmp_path / "cpu.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cpu.py"), "--quick", "--cache", str(tmp_path / "graphs"),
         "--out", str(out), "--plot", str(png)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = out.read_text()
    assert str(tmp_path) not in text and "/work/" not in text  # relative paths only
    data = json.loads(text)
    assert data["quick"] is True
    machine = data["machine"]
    for key in ("platform", "cpu", "cpu_count", "torch", "python", "date_utc", "git_commit", "loadavg_start"):
        assert key in machine
    assert len(machine["loadavg_end"]) == 3
    rates = data["matmul"]["1"]
    assert rates["fp32_gflops"] > 0 and rates["int8_gops"] > 0 and rates["bf16_gflops"] > 0
    assert set(data["variants_skipped"]) == {"torch-bf16"} - VARIANTS
    (albef,) = data["albef"]
    assert set(albef["variants"]) == VARIANTS
    cs = [str(c) for c in data["settings"]["candidates"]]
    for row in albef["variants"].values():
        assert row["text_ms"] > 0 and row["build_images_per_s"] > 0
        assert list(row["rerank_s"]) == cs and all(v > 0 for v in row["rerank_s"].values())
        assert 0.0 <= row["top10_overlap_vs_torch_fp32"] <= 1.0
    assert albef["variants"]["torch-fp32"]["top10_overlap_vs_torch_fp32"] == 1.0
    assert albef["variants"]["onnx-fp32"]["top10_overlap_vs_torch_fp32"] == 1.0  # fp32 ONNX ranks the same
    flops = albef["flops"]
    assert flops["rerank_per_pair"] > 0 and flops["build_per_image"] > 0 and flops["text_query"] > 0
    assert set(albef["ceiling_fp32"]["rerank_s"]) == set(cs)
    (clip,) = data["clip"]
    assert set(clip["variants"]) == VARIANTS - {"torch-bf16"}  # open_clip runs fp32 on a CPU: not a bf16 row
    assert set(clip.get("variants_not_run", {})) == VARIANTS & {"torch-bf16"}
    assert clip["variants"]["onnx-fp32"]["text_cosine_vs_torch_fp32_min"] > 0.9999
    assert png.is_file() and png.stat().st_size > 1000
