"""The shipped models load through their specs and reproduce the numbers their model cards quote on a small
held-out subset (models/weights/card_metrics.json, written by `bench/eval_scenes.py --card`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "models" / "weights" / "card_metrics.json"
sys.path.insert(0, str(ROOT / "bench"))

KEYS = ("tr_r1", "tr_r5", "ir_r1", "ir_r5", "r_mean")


@pytest.mark.skipif(not CARD.is_file(), reason="no card metrics committed")
def test_shipped_models_reproduce_their_card(tmp_path: Path) -> None:
    from eval_scenes import card_metrics

    expected = json.loads(CARD.read_text())
    got = card_metrics(tmp_path)
    assert got["subset"] == expected["subset"]
    assert got.get("fusion", "itm") == expected.get("fusion", "itm")
    for spec in ("alignfuse:scenes-albef", "alignfuse:scenes-clip"):
        # the weights are the ones the card was measured with
        assert got[spec]["model_id"] == expected[spec]["model_id"], spec
        for mode in ("dual", "rerank"):
            for key in KEYS:
                # deterministic on CPU; the tolerance covers float summation order on other CPUs (ties flip)
                assert got[spec][mode][key] == pytest.approx(expected[spec][mode][key], abs=1.5), (
                    spec,
                    mode,
                    key,
                )
    # the perception figures ("a red circle" finds red circles), per pipeline, through the search engine
    assert got["perception"]["gallery"] == expected["perception"]["gallery"]
    for pipe in ("albef", "clip"):
        want, have = expected["perception"][pipe], got["perception"][pipe]
        assert have["dual_id"] == want["dual_id"]
        for key, value in want.items():
            if key.endswith(("_dual", "_rerank")):
                assert have[key] == pytest.approx(value, abs=0.03), (pipe, key)


def test_shipped_weights_load_and_fit_the_size_budget() -> None:
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    weights = ROOT / "models" / "weights"
    total = sum(p.stat().st_size for p in weights.glob("*.safetensors"))
    assert total <= 25 * 1024 * 1024, f"shipped weights are {total / 2**20:.1f} MB (budget 25 MB)"
    albef = create_cross_encoder("alignfuse:scenes-albef")
    assert albef.info.weights != "random-init"
    clip = create_dual_encoder("alignfuse:scenes-clip")
    assert clip.info.weights.endswith("scenes-clip.safetensors")
    for card in ("scenes-albef.md", "scenes-clip.md"):
        text = (weights / card).read_text()
        assert "alignfuse train" in text and "seed" in text


FUSION = ROOT / "models" / "weights" / "scenes-albef.fusion.json"


@pytest.mark.skipif(not FUSION.is_file(), reason="no fusion choice recorded")
def test_shipped_default_fusion_is_the_measured_choice() -> None:
    """The reranker's default fusion is the one that scored better on the validation splits, measured with
    the weights that ship (docs/training/choose_fusion.py)."""
    from alignfuse.models.base import FUSIONS
    from alignfuse.models.builtin import scenes_albef_default_fusion
    from alignfuse.models.registry import create_cross_encoder

    rec = json.loads(FUSION.read_text())
    albef = create_cross_encoder("alignfuse:scenes-albef")
    assert albef.info.weights_sha256.startswith(rec["weights_sha256_prefix"])
    assert albef.info.default_fusion == scenes_albef_default_fusion() == rec["default_fusion"]
    rows = rec["measurements"]
    assert {r["fusion"] for r in rows} == set(FUSIONS)
    assert all("test" not in Path(r["split"]).parent.name for r in rows)  # chosen on validation data only
    mean = {
        f: sum(r["rerank_tr_r1"] + r["rerank_ir_r1"] for r in rows if r["fusion"] == f)
        / sum(2 for r in rows if r["fusion"] == f)
        for f in FUSIONS
    }
    assert mean == pytest.approx(rec["mean_rerank_r1"])
    best = max(mean.values())
    assert mean[rec["default_fusion"]] == best
