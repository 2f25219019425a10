"""int8 and ONNX Runtime on the shipped scenes model, measured with the project's evaluation protocol
(``alignfuse eval``: dual and rerank modes, text→image and image→text R@1) on freshly generated held-out
scene splits (test and compositional). Both numbers are computed here: the shipped model may be retrained.

The bounds: ONNX Runtime fp32 gives the same R@1 as torch fp32 (to 1e-4 on the scores, so to the image),
and int8 (ONNX Runtime dynamic quantization) within 0.5 points of fp32: the issue's bound, met on some CPUs and not
on others (xfail with the numbers). bf16 autocast, on CPUs with native bf16 (AMX / AVX512-BF16): within 2 points
everywhere, and the same bound of 0.5 (xfail with the numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignfuse.data.scenes import caption_matches, generate_scenes
from alignfuse.evaluation.protocol import evaluate
from alignfuse.models.base import cpu_has_native_bf16
from alignfuse.models.builtin import WEIGHTS_DIR
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    not (WEIGHTS_DIR / "scenes-albef.safetensors").is_file(), reason="shipped scenes-albef weights missing"
)

SPEC = "alignfuse:scenes-albef"
N_SCENES = 200  # 0.5 points of R@1 = 1 of 200 images
K_TEST = 8


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scenes-eval")
    return {
        split: generate_scenes(root / split, seed=20261216, count=N_SCENES, split=split)
        for split in ("test", "compositional")
    }


def _r1(runtime: str, precision: str, scenes: Path, cache: Path) -> dict[str, float]:
    dual = create_dual_encoder(SPEC, "cpu", precision, runtime, cache)
    cross = create_cross_encoder(SPEC, "cpu", precision, runtime, cache)
    assert (getattr(dual, "runtime", "torch"), getattr(cross, "runtime", "torch")) == (runtime, runtime)
    report = evaluate(
        None, scenes, None, dual, cross, ("dual", "rerank"), K_TEST, 64,
        fusion=cross.info.default_fusion, truth=caption_matches,
    )  # fmt: skip
    out = {}
    for mode in ("dual", "rerank"):
        rec = report.result(mode).recall
        out[f"{mode}_tr_r1"], out[f"{mode}_ir_r1"] = rec.tr_r1, rec.ir_r1
    return out


@pytest.fixture(scope="module")
def measured(splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict]]:
    """R@1 per split for torch fp32, ONNX fp32 and ONNX int8 (computed once for both tests)."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    out: dict[str, dict[str, dict]] = {}
    for split, scenes in splits.items():
        out[split] = {
            "torch": _r1("torch", "fp32", scenes, cache),
            "onnx32": _r1("onnx", "fp32", scenes, cache),
            "onnx8": _r1("onnx", "int8", scenes, cache),
        }
        if cpu_has_native_bf16():
            out[split]["bf16"] = _r1("torch", "bf16", scenes, cache)
        print(split, out[split])
    return out


def _assert_within(measured: dict[str, dict[str, dict]], variant: str, points: float) -> None:
    """Every R@1 of ``variant`` within ``points`` of torch fp32's, on every split."""
    for split, r in measured.items():
        for key, value in r["torch"].items():
            assert abs(r[variant][key] - value) <= points + 1e-9, (split, key, r[variant][key], value)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scenes_r1_onnx_fp32_matches_torch(measured: dict[str, dict[str, dict]]) -> None:
    _assert_within(measured, "onnx32", 0.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.xfail(
    strict=False,
    reason="int8 parity of the shipped scenes model is not within 0.5 R@1 points: runs L + M + N weights on an "
    "Intel Xeon with AVX-512 VNNI and AMX (2026-12-03) test rerank TR 49.5 vs 51.0 and compositional dual TR 42.5 "
    "vs 41.0 (runs L + M: 51.0 vs 49.5); run-H weights were within 0.5 on the 2026-12-02 machine and up to 2.5 off "
    "on an AVX2-only EPYC. int8 stays opt-in; docs/benchmarks.md",
)
def test_scenes_r1_onnx_int8_within_half_a_point(measured: dict[str, dict[str, dict]]) -> None:
    _assert_within(measured, "onnx8", 0.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16)")
@pytest.mark.xfail(
    strict=False,
    reason="bf16 autocast of the shipped scenes model (runs L + M + N) on an Intel Xeon with AMX (2026-12-03): 6 "
    "of 8 R@1 numbers equal or within 0.5 of fp32 (all 4 of the test split), compositional dual TR 42.5 vs 41.0 "
    "and rerank TR 45.5 vs 44.5; bf16 stays opt-in; docs/benchmarks.md",
)
def test_scenes_r1_torch_bf16_within_half_a_point(measured: dict[str, dict[str, dict]]) -> None:
    _assert_within(measured, "bf16", 0.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16)")
def test_scenes_r1_torch_bf16_within_two_points(measured: dict[str, dict[str, dict]]) -> None:
    """bf16 is never far off on the shipped model: at most 4 of the 200 images move, in any R@1."""
    _assert_within(measured, "bf16", 2.0)
