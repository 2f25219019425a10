"""The convolutional patch stem (``AlbefConfig.patch_stem="conv"``): same token grid as the linear embedding,
its own parameter names (so official checkpoints, which have the linear one, are told apart), config checks."""

from __future__ import annotations

import pytest
import torch

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.config import AlbefConfig, get_albef_config
from alignfuse.models.albef.model import AlbefModel
from alignfuse.models.albef.stem import ConvStem, HybridStem, stem_strides


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


@pytest.mark.parametrize("patch", [12, 16])
def test_hybrid_stem_gives_the_patch_grid(patch: int) -> None:
    stem = HybridStem(patch, 48)
    assert stem(torch.randn(2, 3, patch * 4, patch * 4)).shape == (2, 48, 4, 4)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in stem.modules()) == len(stem_strides(patch))


def test_hybrid_stem_sees_each_patch_alone() -> None:
    """Token (i, j) of the hybrid stem depends on pixels of its own patch and a 3×3 conv's reach around it, never on
    far-away pixels: changing one corner patch leaves the opposite corner's token unchanged."""
    torch.manual_seed(0)
    stem = HybridStem(12, 32).eval()
    x = torch.randn(1, 3, 48, 48)
    y = x.clone()
    y[..., :12, :12] += 1.0
    a, b = stem(x), stem(y)
    assert not torch.allclose(a[..., 0, 0], b[..., 0, 0])
    assert torch.allclose(a[..., 3, 3], b[..., 3, 3])


def test_max_pooled_itc_reads_the_patch_tokens_not_cls() -> None:
    cfg = get_albef_config("tiny").replace(patch_stem="hybrid", image_pool="max")
    torch.manual_seed(0)
    model = AlbefModel(cfg).eval()
    tokens = model.image_tokens(torch.randn(3, 3, cfg.image_res, cfg.image_res))
    emb = model.image_embed(tokens)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    changed = tokens.clone()
    changed[:, 0] += 5.0  # the CLS token does not enter a max-pooled embedding
    assert torch.allclose(model.image_embed(changed), emb)
    bumped = tokens.clone()
    bumped[:, 1:, 0] += 5.0  # the patch tokens do
    assert not torch.allclose(model.image_embed(bumped), emb)
    cls_model = AlbefModel(cfg.replace(image_pool="cls")).eval()
    cls_model.load_state_dict(model.state_dict())  # same parameters: the readout is not a weight
    assert not torch.allclose(cls_model.image_embed(changed), cls_model.image_embed(tokens))


def test_new_vision_options_round_trip_and_are_checked() -> None:
    cfg = get_albef_config("tiny").replace(patch_stem="hybrid", image_pool="max")
    again = AlbefConfig.from_dict(cfg.to_dict())
    assert (again.patch_stem, again.image_pool) == ("hybrid", "max")
    assert AlbefConfig.from_dict({}).image_pool == "cls"  # ALBEF's own configs read the CLS token
    with pytest.raises(InvalidInputError, match="image_pool"):
        get_albef_config("tiny").replace(image_pool="mean")
