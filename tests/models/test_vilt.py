"""ViLT adapter with a tiny random ViltConfig saved to (and loaded from) a local directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import CrossEncoder, GroundingModel
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder, list_models
from alignfuse.models.vilt import ViltCrossEncoder

transformers = pytest.importorskip("transformers")

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "red",
    "blue",
    "circle",
    "star",
    "dog",
    "on",
    "the",
]
WORDS += [f"w{i}" for i in range(40)]
TEXT = "a red circle on the dog"


def save_tiny_vilt(out: Path) -> Path:
    """A random-init tiny ViLT + its processor, written with ``save_pretrained`` (a ``vilt:<dir>`` spec)."""
    from transformers import (
        BertTokenizer,
        ViltConfig,
        ViltForImageAndTextRetrieval,
        ViltImageProcessor,
        ViltProcessor,
    )

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    config = ViltConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        max_position_embeddings=40,
        initializer_range=0.2,  # big enough that different pairs get clearly different scores
    )
    torch.manual_seed(0)
    ViltForImageAndTextRetrieval(config).save_pretrained(out)
    image_processor = ViltImageProcessor(size={"shortest_edge": 64}, size_divisor=16)  # type: ignore[call-arg]
    ViltProcessor(image_processor, tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vilt(tmp_path_factory.mktemp("vilt-tiny"))


@pytest.fixture(scope="module")
def vilt(vilt_dir: Path) -> ViltCrossEncoder:
    enc = create_cross_encoder(f"vilt:{vilt_dir}")
    assert isinstance(enc, ViltCrossEncoder)
    return enc


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    # landscape, portrait, square and a very wide one (its longer side is capped): different patch grids
    shapes = [(40, 90), (100, 50), (64, 64), (30, 120)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def _reference(vilt_dir: Path, image: Image.Image, text: str) -> float:
    """The transformers model called directly, with its own processor (as its model card does)."""
    from transformers import ViltForImageAndTextRetrieval, ViltProcessor

    processor = ViltProcessor.from_pretrained(vilt_dir)
    model = ViltForImageAndTextRetrieval.from_pretrained(vilt_dir).eval()
    with torch.no_grad():
        return float(model(**processor(image, text, return_tensors="pt")).logits[0, 0])


def test_protocol_and_info(vilt: ViltCrossEncoder) -> None:
    assert isinstance(vilt, CrossEncoder)
    assert vilt.info.family == "vilt"
    assert vilt.info.image_states_cacheable is False  # the engine plans per-pair full passes, no cache
    assert vilt.info.default_fusion == "itm"
    assert len(vilt.info.weights_sha256) == 64
    assert vilt.max_text_len == 40


def test_scores_equal_transformers(vilt: ViltCrossEncoder, vilt_dir: Path) -> None:
    images = _images()
    pixels = torch.stack([vilt.image_transform(im) for im in images])
    out = vilt.score(vilt.text_states([TEXT]), vilt.image_states(pixels))
    ref = np.array([_reference(vilt_dir, im, TEXT) for im in images], dtype=np.float32)
    np.testing.assert_allclose(out.logit, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.prob, 1 / (1 + np.exp(-ref)), rtol=1e-4, atol=1e-6)
    assert np.ptp(ref) > 1e-3  # the images really score differently: the comparison could fail
    # one image × several texts (image→text) and aligned pairs agree with the broadcast form
    texts = [TEXT, "a blue star", "the dog on a circle"]
    by_text = vilt.score(vilt.text_states(texts), vilt.image_states(pixels[:1]))
    assert by_text.logit[0] == pytest.approx(out.logit[0], abs=1e-5)
    ref_texts = [_reference(vilt_dir, images[0], t) for t in texts]
    np.testing.assert_allclose(by_text.logit, ref_texts, rtol=1e-4, atol=1e-5)


def test_padding_changes_nothing(vilt: ViltCrossEncoder) -> None:
    """A small image scored alone (little canvas trimmed away) or beside a big one (more padding)."""
    images = _images()
    pixels = torch.stack([vilt.image_transform(im) for im in images])
    ts = vilt.text_states([TEXT])
    together = vilt.score(ts, vilt.image_states(pixels)).logit
    alone = [float(vilt.score(ts, vilt.image_states(pixels[i : i + 1])).logit[0]) for i in range(len(images))]
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    # the fp16 round trip of the engine's rerank kernel stays below the 8-bit input's quantisation
    half = vilt.score(ts, vilt.image_states_from_tokens(pixels.to(torch.float16))).logit
    np.testing.assert_allclose(half, together, atol=1e-3)


def test_preprocessing_is_vilts(vilt: ViltCrossEncoder) -> None:
    t = vilt.image_transform(Image.new("RGB", (90, 40)))  # w=90, h=40: shorter side → 64, longer ≤ 106
    assert t.shape == (4, vilt.bundle.canvas, vilt.bundle.canvas)
    h, w = int(t[3].any(dim=1).sum()), int(t[3].any(dim=0).sum())
    assert (h, w) == (32, 96)  # DETR-style cap of the longer side, then multiples of size_divisor 16
    assert vilt.info.preprocess.image_size == 64 and vilt.info.preprocess.mean == (0.5, 0.5, 0.5)


def test_extreme_aspect_ratio_is_a_clear_error(vilt: ViltCrossEncoder) -> None:
    """ViLT's own rounding leaves a 20x200 image 0 px high: an InvalidInputError (the engine falls back to
    ITC for that candidate), not a bare ValueError."""
    with pytest.raises(InvalidInputError, match="cannot preprocess a 200x20 image"):
        vilt.image_transform(Image.new("RGB", (200, 20)))


def test_tokens_are_truncated_to_40(vilt: ViltCrossEncoder) -> None:
    long_text = " ".join(f"w{i}" for i in range(60))
    ts = vilt.text_states([long_text])
    assert ts.ids.shape == (1, 40) and int(ts.mask.sum()) == 40
    with pytest.raises(InvalidInputError):
        vilt.text_states(["   "])


def test_no_cacheable_states_and_no_grounding(vilt: ViltCrossEncoder) -> None:
    with pytest.raises(InvalidInputError, match="no cacheable image tokens"):
        vilt.image_states_from_tokens(torch.zeros(2, 5, 32))
    with pytest.raises(InvalidInputError, match="canvases"):
        vilt.image_states(torch.zeros(1, 3, 64, 64))
    assert isinstance(vilt, GroundingModel)
    with pytest.raises(InvalidInputError, match="not supported for ViLT"):
        vilt.grounding(TEXT, torch.zeros(1, 4, 96, 96))


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no dual encoder"):
        create_dual_encoder("vilt:dandelin/vilt-b32-finetuned-coco")
    with pytest.raises(InvalidInputError, match="no '@tag'"):
        create_cross_encoder("vilt:dandelin/vilt-b32-finetuned-coco@x")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        create_cross_encoder(f"vilt:{tmp_path / 'missing'}")
    with pytest.raises(ModelUnavailableError, match="no config.json"):
        create_cross_encoder(f"vilt:{tmp_path}")
    specs = {m.spec: m for m in list_models()}
    assert specs["vilt:dandelin/vilt-b32-finetuned-coco"].kind == "cross"


def test_offline_missing_download_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id that is not cached, with the hub's offline switch on: ModelUnavailableError naming the
    local-directory form, without a single connection attempt (no minute of retries)."""
    import socket

    from huggingface_hub import constants

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE") as exc:
        create_cross_encoder("vilt:dandelin/vilt-b32-finetuned-coco")
    assert "vilt:/path/to/vilt-dir" in exc.value.message
