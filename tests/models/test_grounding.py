"""Grounding (Grad-CAM on ALBEF's fusion cross-attention): checked against a hand computation on albef:tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.adapters import AlbefCrossEncoder
from alignfuse.models.albef.bert import _split_heads
from alignfuse.models.albef.grounding import default_layer
from alignfuse.models.base import GroundingModel, heatmaps_per_word, merge_word_pieces
from alignfuse.models.registry import create_cross_encoder

TEXT = "A red circle left of a blue square."


@pytest.fixture(scope="module")
def albef() -> AlbefCrossEncoder:
    enc = create_cross_encoder("albef:tiny")
    assert isinstance(enc, AlbefCrossEncoder)
    return enc


def _pixels(enc: AlbefCrossEncoder) -> torch.Tensor:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    return enc.image_transform(img).unsqueeze(0)


def _hand_gradcam(enc: AlbefCrossEncoder, text: str, pixels: torch.Tensor, layer: int) -> np.ndarray:
    """Independent computation through the model's own scoring path: capture the context vector that the
    cross-attention of fusion layer ``layer`` hands to its output block (a forward pre-hook), differentiate
    the match logit against it, and apply the chain rule by hand: dlogit/dA[h,t,j] = g_ctx[h,t] . V[h,j];
    A = softmax(Q K^T / sqrt(d)) from the layer's own projections."""
    model = enc.model
    ids, mask = enc._tokens([text])
    n = int(mask.sum())
    ids, mask = ids[:, :n], mask[:, :n]
    lyr = model.text_encoder.fusion_layers[layer]
    attn = lyr.crossattention.self
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ctx = args[0].detach().requires_grad_(True)
        captured["ctx"], captured["x"] = ctx, args[1].detach()
        return (ctx, args[1])

    handle = lyr.crossattention.output.register_forward_pre_hook(pre_hook)
    try:
        with torch.enable_grad():
            tokens = model.image_tokens(pixels)
            fused = model.fuse(model.text_states(ids, mask), mask, tokens)
            logit = model.itm_head(fused[:, 0])[0, 1]
            (g_ctx,) = torch.autograd.grad(logit, captured["ctx"])
    finally:
        handle.remove()
    with torch.no_grad():
        q = _split_heads(attn.query(captured["x"]), attn.num_heads)[0]  # [h, T, d]
        k, v = attn.project_kv(tokens)
        a = torch.softmax(q @ k[0].transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [h, T, L]
        g = _split_heads(g_ctx, attn.num_heads)[0] @ v[0].transpose(-1, -2)  # dlogit/dA, [h, T, L]
        cam = (a * g.clamp(min=0)).mean(dim=0)  # heads averaged, positive part
    grid = round((cam.shape[1] - 1) ** 0.5)
    return cam[1:, 1:].reshape(-1, grid, grid).numpy()  # text [CLS] row and image CLS column dropped


def test_heatmap_equals_hand_computed_gradcam(albef: AlbefCrossEncoder) -> None:
    pixels = _pixels(albef)
    for layer in (0, 1):
        g = albef.grounding(TEXT, pixels, layer=layer)
        hand = _hand_gradcam(albef, TEXT, pixels, layer)
        assert hand.shape[0] == len(g.tokens)
        expected = heatmaps_per_word(hand, g.word_of_token, len(g.words))
        np.testing.assert_allclose(g.heatmaps, expected, rtol=1e-4, atol=1e-7)
        if layer == 0:  # (layer 1 is tiny's last fusion layer: all zero, see below)
            assert float(hand.max()) > 0.0 and np.count_nonzero(hand) > hand.size // 4  # non-trivial


def test_shapes_tokens_and_score(albef: AlbefCrossEncoder) -> None:
    pixels = _pixels(albef)
    g = albef.grounding(TEXT, pixels)
    cfg = albef.bundle.config
    side = cfg.image_res // cfg.patch_size
    assert g.grid == (side, side)
    assert g.words == (
        "a",
        "red",
        "circle",
        "left",
        "of",
        "a",
        "blue",
        "square",
    )  # pre_caption: lower, no "."
    assert g.heatmaps.shape == (len(g.words), side, side) and g.heatmaps.dtype == np.float32
    assert (g.heatmaps >= 0).all()
    assert g.layer == default_layer(albef.model) == 0  # tiny: 2 fusion layers, never the last
    s = albef.score(albef.text_states([TEXT]), albef.image_states(pixels))
    assert g.logit == pytest.approx(float(s.logit[0]), abs=1e-5)
    assert g.prob == pytest.approx(float(s.prob[0]), abs=1e-6)
    assert isinstance(albef, GroundingModel)


def test_word_pieces_are_merged(albef: AlbefCrossEncoder) -> None:
    pieces = albef.tokenizer.tokenize("zebra")
    g = albef.grounding("a zebra", _pixels(albef))
    assert g.words == ("a", "zebra")
    assert g.tokens == ("a", *pieces)
    if len(pieces) > 1:  # the tiny vocabulary splits it: the word's map is the sum of its pieces' maps
        assert g.word_of_token == (0,) + (1,) * len(pieces)
    assert merge_word_pieces(["a", "tri", "##ang", "##le", "on", "##e"]) == (
        ("a", "triangle", "one"),
        (0, 1, 1, 1, 2, 2),
    )
    maps = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    np.testing.assert_array_equal(heatmaps_per_word(maps, (0, 1, 1), 2), [maps[0], maps[1] + maps[2]])


def test_last_layer_has_no_word_gradient_and_bad_layers(albef: AlbefCrossEncoder) -> None:
    g = albef.grounding(TEXT, _pixels(albef), layer=1)  # the last fusion layer: only [CLS] reaches ITM
    assert float(g.heatmaps.max()) == 0.0
    with pytest.raises(InvalidInputError, match="fusion layer index"):
        albef.grounding(TEXT, _pixels(albef), layer=2)
    with pytest.raises(InvalidInputError):
        albef.grounding("  ", _pixels(albef))


# -- BLIP (through transformers): the same recipe on its text layers' cross-attention -------------------------
from .test_blip import blip_dir  # noqa: E402,F401  (the tiny saved BLIP fixture)


def _hand_gradcam_blip(enc: object, text: str, pixels: torch.Tensor, layer: int) -> np.ndarray:
    """Chain rule by hand through transformers' own forward: grad of the match logit w.r.t. the context that
    layer ``layer``'s cross-attention hands to its output block, times V, gives dlogit/dA."""
    model = enc.model  # type: ignore[attr-defined]
    ids, mask = enc._tokens([text])  # type: ignore[attr-defined]
    n = int(mask.sum())
    ids, mask = ids[:, :n], mask[:, :n]
    lyr = model.text_encoder.encoder.layer[layer].crossattention
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ctx = args[0].detach().requires_grad_(True)
        captured["ctx"], captured["x"] = ctx, args[1].detach()
        return (ctx, args[1])

    handle = lyr.output.register_forward_pre_hook(pre_hook)
    try:
        with torch.enable_grad():
            tokens = model.vision_model(pixel_values=pixels).last_hidden_state
            atts = torch.ones(tokens.shape[:2], dtype=torch.long)
            hidden = model.text_encoder(
                input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens, encoder_attention_mask=atts
            ).last_hidden_state
            logit = model.itm_head(hidden[:, 0])[0, 1]
            (g_ctx,) = torch.autograd.grad(logit, captured["ctx"])
    finally:
        handle.remove()
    sa = lyr.self
    h, d = sa.num_attention_heads, sa.attention_head_size
    with torch.no_grad():
        q = sa.query(captured["x"])[0].view(n, h, d).transpose(0, 1)
        k = sa.key(tokens)[0].view(-1, h, d).transpose(0, 1)
        v = sa.value(tokens)[0].view(-1, h, d).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        g = g_ctx[0].view(n, h, d).transpose(0, 1) @ v.transpose(-1, -2)
        cam = (a * g.clamp(min=0)).mean(dim=0)
    side = round((cam.shape[1] - 1) ** 0.5)
    return cam[1 : n - 1, 1:].reshape(-1, side, side).numpy()


def test_blip_heatmap_equals_hand_computed_gradcam(blip_dir: object) -> None:  # noqa: F811
    enc = create_cross_encoder(f"blip:{blip_dir}")
    rng = np.random.default_rng(0)
    pixels = enc.image_transform(
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    ).unsqueeze(0)
    text = "a red circle on the dog"
    g = enc.grounding(text, pixels, layer=0)  # type: ignore[attr-defined]
    assert g.words == tuple(text.split()) and g.grid == (2, 2)  # 32 px / 16 px patches
    hand = _hand_gradcam_blip(enc, text, pixels, 0)
    assert float(hand.max()) > 0.0
    np.testing.assert_allclose(
        g.heatmaps, heatmaps_per_word(hand, g.word_of_token, len(g.words)), rtol=1e-4, atol=1e-8
    )
    s = enc.score(enc.text_states([text]), enc.image_states(pixels))
    assert g.logit == pytest.approx(float(s.logit[0]), abs=1e-5)
    default = enc.grounding(text, pixels)  # type: ignore[attr-defined]
    assert g.layer == 0 and default.layer == 0  # 2 text layers: never the last
    with pytest.raises(InvalidInputError):
        enc.grounding(text, pixels, layer=2)  # type: ignore[attr-defined]
