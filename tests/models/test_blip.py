"""BLIP adapter with a tiny random BlipConfig saved to (and loaded from) a local directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import CrossEncoder, DualEncoder
from alignfuse.models.blip import BlipCrossEncoder, BlipDualEncoder
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

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


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("blip-tiny")
    vocab = {w: i for i, w in enumerate(WORDS)}
    tokenizer = BertTokenizer(vocab=vocab)
    config = BlipConfig(
        text_config={
            "vocab_size": len(WORDS) + 2,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "bos_token_id": len(WORDS),
            "sep_token_id": 3,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 16,
        },
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(out)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(out)
    return out


def _pixels(enc: BlipDualEncoder | BlipCrossEncoder, n: int) -> torch.Tensor:
    rng = np.random.default_rng(1)
    ims = [Image.fromarray(rng.integers(0, 255, (20 + i, 50, 3), dtype=np.uint8)) for i in range(n)]
    return torch.stack([enc.image_transform(im) for im in ims])


def test_both_protocols_from_local_dir(blip_dir: Path) -> None:
    dual = create_dual_encoder(f"blip:{blip_dir}")
    cross = create_cross_encoder(f"blip:{blip_dir}")
    assert isinstance(dual, DualEncoder) and isinstance(cross, CrossEncoder)
    assert isinstance(dual, BlipDualEncoder) and dual.model is cross.model
    assert dual.info.preprocess.image_size == 32 and dual.info.preprocess.resize_mode == "squash"
    assert dual.info.weights.endswith("model.safetensors") and len(dual.info.weights_sha256) == 64

    px = _pixels(dual, 3)
    img, txt = dual.encode_images(px), dual.encode_texts(["a red circle", "the blue star", "a dog"])
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    # same numbers as transformers' own use_itm_head=False path
    ids, mask = dual._tokens(["a red circle"])
    with torch.no_grad():
        sims = dual.model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
    np.testing.assert_allclose(img @ txt[:1].T, sims.numpy(), atol=1e-5)

    ims = cross.image_states(px)
    ts = cross.text_states(["a red circle"])
    assert ts.hidden is None and ims.tokens.shape == (3, 5, 32)
    scores = cross.score(ts, ims)
    assert scores.logit.shape == (3,) and np.all((scores.prob >= 0) & (scores.prob <= 1))
    with torch.no_grad():
        ref = cross.model(
            input_ids=ts.ids.expand(3, -1),
            pixel_values=px,
            attention_mask=ts.mask.expand(3, -1),
            use_itm_head=True,
        ).itm_score
    np.testing.assert_allclose(scores.logit, ref[:, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(scores.prob, ref.softmax(-1)[:, 1].numpy(), atol=1e-5)
    # aligned pairs and 1 image x many texts
    many = cross.text_states(["a red circle", "the blue star", "a dog"])
    assert cross.score(many, ims).logit.shape == (3,)
    np.testing.assert_allclose(cross.score(many, ims.select([0])).logit[0], scores.logit[0], atol=1e-5)
    with pytest.raises(InvalidInputError):
        cross.text_states([" "])


def test_missing_blip_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        create_cross_encoder(f"blip:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="config.json"):
        create_cross_encoder(f"blip:{tmp_path / 'empty'}")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE"):
        create_cross_encoder("blip:Salesforce/blip-itm-base-coco")
