"""bench/int8_split.py end to end at toy size (not its timings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._toy import run_toy


def test_int8_split_toy(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    r = run_toy("int8_split", tmp_path, timeout=300)
    assert set(r["variants"]) == {
        "all int8",
        "attention Q/K/V fp32",
        "FFN + attention outputs fp32",
        "cross-attention queries fp32",
    }
    kept = {k: v["kept_fp32"] for k, v in r["variants"].items()}
    assert kept["all int8"] == 0 and all(n > 0 for k, n in kept.items() if k != "all int8"), kept
    for v in r["variants"].values():
        assert 0.0 <= v["top10_overlap_mean"] <= 1.0 and v["top10_overlap_min"] <= v["top10_overlap_mean"]
        assert v["logit_noise_std"] > 0  # int8 changes the logits (the measure is of something)
