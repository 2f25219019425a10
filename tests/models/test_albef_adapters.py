"""ALBEF behind the DualEncoder / CrossEncoder protocols, through the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.albef.adapters import AlbefCrossEncoder, AlbefDualEncoder, build_albef
from alignfuse.models.albef.config import ALBEF_CONFIGS
from alignfuse.models.base import CrossEncoder, DualEncoder, ImageStates
from alignfuse.models.hub import sha256_file
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder, list_models

TEXTS = ["a red circle left of a blue star", "two small green squares", "a large yellow cross"]


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 90, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def pair() -> tuple[AlbefDualEncoder, AlbefCrossEncoder]:
    dual = create_dual_encoder("albef:tiny")
    cross = create_cross_encoder("albef:tiny")
    assert isinstance(dual, AlbefDualEncoder) and isinstance(cross, AlbefCrossEncoder)
    return dual, cross


def test_protocols_and_shared_model(pair: tuple[AlbefDualEncoder, AlbefCrossEncoder]) -> None:
    dual, cross = pair
    assert isinstance(dual, DualEncoder) and isinstance(cross, CrossEncoder)
    assert dual.model is cross.model  # one loaded AlbefModel
    assert dual.info.weights == "random-init" and len(dual.info.weights_sha256) == 64
    pre = dual.info.preprocess
    assert (pre.image_size, pre.resize_mode, pre.center_crop, pre.interpolation) == (
        64,
        "squash",
        False,
        "bicubic",
    )
    assert dual.info.family == "albef" and dual.embed_dim == 32
    again = create_dual_encoder("albef:tiny")
    assert again.info.weights_sha256 == dual.info.weights_sha256  # deterministic random init


def test_transform_squashes_without_crop(pair: tuple[AlbefDualEncoder, AlbefCrossEncoder]) -> None:
    dual, _ = pair
    img = Image.new("RGB", (200, 50), (255, 0, 0))
    img.paste((0, 0, 255), (150, 0, 200, 50))  # right quarter blue: survives only without a centre crop
    x = dual.image_transform(img)
    assert x.shape == (3, 64, 64)
    mean, std = np.array(dual.info.preprocess.mean), np.array(dual.info.preprocess.std)
    red = (np.array([1.0, 0.0, 0.0]) - mean) / std
    blue = (np.array([0.0, 0.0, 1.0]) - mean) / std
    np.testing.assert_allclose(x[:, 32, 5].numpy(), red, atol=1e-4)
    np.testing.assert_allclose(x[:, 32, 60].numpy(), blue, atol=1e-4)


def test_dual_encoder_outputs(pair: tuple[AlbefDualEncoder, AlbefCrossEncoder]) -> None:
    dual, _ = pair
    px = torch.stack([dual.image_transform(im) for im in _images(3)])
    img, txt = dual.encode_images(px), dual.encode_texts(TEXTS)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert img.dtype == np.float32 == txt.dtype
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert dual.encode_texts([]).shape == (0, 32)
    emb, tokens = dual.encode_images_with_tokens(px)
    np.testing.assert_allclose(emb, img, atol=1e-6)
    assert tokens.shape == (3, 17, 64) and tokens.dtype == torch.float16
    with pytest.raises(InvalidInputError):
        dual.encode_images(torch.zeros(1, 3, 32, 32))


def test_cross_encoder_scores(pair: tuple[AlbefDualEncoder, AlbefCrossEncoder]) -> None:
    dual, cross = pair
    px = torch.stack([dual.image_transform(im) for im in _images(4)])
    ims = cross.image_states(px)
    ts = cross.text_states(TEXTS[:1])
    one_x_many = cross.score(ts, ims)
    assert one_x_many.logit.shape == (4,) and one_x_many.prob.shape == (4,)
    assert np.all((one_x_many.prob >= 0) & (one_x_many.prob <= 1))
    # probability is softmax of the two logits: monotone in the match logit for equal "no" logits is not
    # guaranteed, so check against the model directly
    with torch.no_grad():
        logits = cross.model.itm_logits(ts.hidden, ts.mask, ims.tokens)
    np.testing.assert_allclose(one_x_many.logit, logits[:, 1].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_x_many.prob, logits.softmax(-1)[:, 1].numpy(), rtol=1e-5, atol=1e-6)
    # pairwise = broadcast; text states without hidden are recomputed; selection works
    for i in range(4):
        single = cross.score(ts, ims.select([i]))
        np.testing.assert_allclose(single.logit, one_x_many.logit[i : i + 1], rtol=1e-5, atol=1e-5)
    bare = type(ts)(ts.ids, ts.mask, None)
    np.testing.assert_allclose(cross.score(bare, ims).logit, one_x_many.logit, rtol=1e-5, atol=1e-5)
    many_texts = cross.score(cross.text_states(TEXTS), ims.select([0]))
    assert many_texts.logit.shape == (3,)
    with pytest.raises(InvalidInputError):
        cross.score(cross.text_states(TEXTS), ims)  # 3 x 4 does not pair


def test_kv_cache_and_fp16_tokens(pair: tuple[AlbefDualEncoder, AlbefCrossEncoder]) -> None:
    dual, cross = pair
    cached = AlbefCrossEncoder(cross.bundle, cross.info, kv_cache=True, max_pairs=3)
    px = torch.stack([dual.image_transform(im) for im in _images(5)])
    plain_states = cross.image_states(px)
    kv_states = cached.image_states(px)
    assert plain_states.kv is None and kv_states.kv is not None and len(kv_states.kv) == 2
    ts = cross.text_states(TEXTS[1:2])
    a, b = cross.score(ts, plain_states), cached.score(ts, kv_states)  # b runs in chunks of 3
    np.testing.assert_allclose(a.logit, b.logit, rtol=1e-5, atol=1e-5)
    # the feature cache stores fp16 tokens: rebuilding states from them works and stays close
    from_cache = cached.image_states_from_tokens(plain_states.tokens.half())
    assert isinstance(from_cache, ImageStates) and from_cache.tokens.dtype == torch.float32
    np.testing.assert_allclose(cached.score(ts, from_cache).logit, a.logit, atol=5e-3)
    with pytest.raises(InvalidInputError):
        cached.image_states_from_tokens(torch.zeros(1, 5, 64))


def test_local_config_and_weights_spec(
    tmp_path: Path, pair: tuple[AlbefDualEncoder, AlbefCrossEncoder]
) -> None:
    from safetensors.torch import save_file

    _, cross = pair
    cfg = tmp_path / "cfg.json"
    ALBEF_CONFIGS["tiny"].to_json(cfg)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in cross.model.state_dict().items()}, str(weights))
    spec = f"albef:{cfg}@{weights}"
    loaded = create_cross_encoder(spec)
    assert loaded.info.weights_sha256 == sha256_file(weights) and loaded.info.spec == spec
    px = torch.stack([cross.image_transform(im) for im in _images(2)])
    ts = cross.text_states(TEXTS[:1])
    np.testing.assert_allclose(
        loaded.score(ts, loaded.image_states(px)).logit,
        cross.score(ts, cross.image_states(px)).logit,
        atol=1e-6,
    )


def test_bad_specs_fail_clearly() -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        create_cross_encoder("albef:tiny@/nonexistent/mscoco.pth")
    with pytest.raises(InvalidInputError, match="unknown ALBEF weights tag"):
        create_dual_encoder("albef:base@imagenet")
    with pytest.raises(InvalidInputError, match="unknown ALBEF config"):
        create_dual_encoder("albef:huge")
    specs = {e.spec for e in list_models()}
    assert {
        "albef:tiny",
        "albef:base@coco",
        "albef:base@flickr30k",
        "albef:base@4m",
        "albef:base@14m",
    } <= specs


def test_build_albef_directly() -> None:
    bundle = build_albef(ALBEF_CONFIGS["tiny"], None, "cpu", "bf16", seed=1)  # bf16 on CPU runs fp32 (logged)
    assert bundle.dtype == torch.float32 and not bundle.model.training
    assert all(not p.requires_grad for p in bundle.model.parameters())
