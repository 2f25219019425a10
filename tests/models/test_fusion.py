"""Score fusion of the ITM logit with the dual encoder's cosine, and the logit scale each dual encoder reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignfuse.errors import InvalidInputError
from alignfuse.models.base import FUSIONS, fuse_scores
from alignfuse.models.registry import create_dual_encoder


def test_fusions_combine_logit_and_cosine_as_documented() -> None:
    logit = np.array([2.0, 1.0, -0.5], dtype=np.float32)
    cos = np.array([0.1, 0.3, 0.5], dtype=np.float32)
    assert fuse_scores(logit, cos, "itm").tolist() == logit.tolist()
    assert fuse_scores(logit, cos, "itm+itc") == pytest.approx([2.1, 1.3, 0.0])
    # on the logit scale the cosine can reorder what the ITM logit alone would not
    fused = fuse_scores(logit, cos, "itm+itc_logit", 10.0)
    assert fused == pytest.approx([3.0, 4.0, 4.5])
    assert np.argsort(-fused).tolist() == [2, 1, 0] and fused.dtype == np.float32
    assert set(FUSIONS) == {"itm", "itm+itc", "itm+itc_logit"}


@pytest.mark.parametrize("scale", [None, 0.0, -1.0])
def test_logit_fusion_needs_a_positive_scale(scale: float | None) -> None:
    with pytest.raises(InvalidInputError, match="logit scale"):
        fuse_scores(np.zeros(2), np.zeros(2), "itm+itc_logit", scale)


def test_unknown_fusion_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="fusion must be one of"):
        fuse_scores(np.zeros(2), np.zeros(2), "itc")


def test_dual_encoders_report_their_learned_logit_scale() -> None:
    torch.set_num_threads(1)
    clip = create_dual_encoder("alignfuse:random-tiny")
    want = float(clip.model.logit_scale.detach().exp())  # type: ignore[attr-defined]
    assert clip.info.itc_logit_scale == pytest.approx(want) and want == pytest.approx(1 / 0.07, rel=1e-3)
    albef = create_dual_encoder("albef:tiny")
    temp = float(albef.bundle.model.temp.detach())  # type: ignore[attr-defined]
    assert albef.info.itc_logit_scale == pytest.approx(1 / temp)
    assert math.isfinite(albef.info.itc_logit_scale)


def test_default_fusion_falls_back_where_the_dual_encoder_has_no_logit_scale() -> None:
    from alignfuse.models.base import default_fusion_for

    assert default_fusion_for("itm+itc_logit", 14.3) == "itm+itc_logit"
    assert default_fusion_for("itm+itc_logit", None) == "itm+itc"
    assert default_fusion_for("itm+itc", None) == "itm+itc" and default_fusion_for("itm", 14.3) == "itm"
    assert default_fusion_for("something-else", 14.3) == "itm"
