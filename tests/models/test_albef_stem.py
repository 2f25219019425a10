"""The convolutional patch stem (``AlbefConfig.patch_stem="conv"``): same token grid as the linear embedding,
its own parameter names (so official checkpoints, which have the linear one, are told apart), config checks."""

from __future__ import annotations

import pytest
import torch

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.config import AlbefConfig, get_albef_config
from alignfuse.models.albef.model import AlbefModel
from alignfuse.models.albef.stem import ConvStem, stem_strides


@pytest.mark.parametrize(("patch", "strides"), [(12, [2, 2, 3]), (16, [2, 2, 2, 2]), (14, [2, 7]), (3, [3])])
def test_strides_multiply_to_the_patch_size(patch: int, strides: list[int]) -> None:
    assert stem_strides(patch) == strides


@pytest.mark.parametrize("patch", [12, 16])
def test_conv_stem_gives_the_patch_grid(patch: int) -> None:
    stem = ConvStem(patch, 64)
    out = stem(torch.randn(2, 3, patch * 5, patch * 5))
    assert out.shape == (2, 64, 5, 5)


def test_conv_stem_model_has_the_same_tokens_and_other_keys() -> None:
    base = get_albef_config("tiny")
    linear, conv = AlbefModel(base), AlbefModel(base.replace(patch_stem="conv"))
    x = torch.randn(2, 3, base.image_res, base.image_res)
    assert (
        linear.image_tokens(x).shape
        == conv.image_tokens(x).shape
        == (2, base.num_image_tokens, base.vision_width)
    )
    lk, ck = set(linear.state_dict()), set(conv.state_dict())
    assert "visual_encoder.patch_embed.proj.weight" in lk - ck
    assert any(k.startswith("visual_encoder.patch_embed.proj.net.") for k in ck - lk)
    assert {k for k in lk ^ ck if "patch_embed" not in k} == set()
    # a linear-stem state dict does not load into a conv-stem model
    with pytest.raises(RuntimeError):
        conv.load_state_dict(linear.state_dict())


def test_conv_stem_round_trips_through_json(tmp_path: object) -> None:
    cfg = get_albef_config("tiny").replace(patch_stem="conv")
    assert AlbefConfig.from_dict(cfg.to_dict()).patch_stem == "conv"
    with pytest.raises(InvalidInputError, match="patch_stem"):
        get_albef_config("tiny").replace(patch_stem="resnet")
