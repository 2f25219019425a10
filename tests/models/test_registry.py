"""Spec parsing, the family registry, the open_clip adapter and the random-tiny test model."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import DualEncoder
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder, list_models, parse_spec


@pytest.mark.parametrize(
    ("spec", "family", "name", "tag"),
    [
        ("open_clip:ViT-B-32@laion2b_s34b_b79k", "open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
        ("open_clip:hf-hub:org/repo", "open_clip", "hf-hub:org/repo", None),
        ("albef:base@coco", "albef", "base", "coco"),
        ("albef:base@/path/to/file.pth", "albef", "base", "/path/to/file.pth"),
        ("albef:/cfg/x.json@/w/x.pth", "albef", "/cfg/x.json", "/w/x.pth"),
        ("blip:Salesforce/blip-itm-base-coco", "blip", "Salesforce/blip-itm-base-coco", None),
        ("alignfuse:random-tiny", "alignfuse", "random-tiny", None),
        ("  open_clip:ViT-B-32  ", "open_clip", "ViT-B-32", None),
    ],
)
def test_parse_spec(spec: str, family: str, name: str, tag: str | None) -> None:
    ms = parse_spec(spec)
    assert (ms.family, ms.name, ms.tag) == (family, name, tag)
    assert ms.raw == spec.strip()


@pytest.mark.parametrize("bad", ["", "   ", "ViT-B-32", ":x", "open_clip:", "open_clip:@tag", "albef:base@"])
def test_parse_spec_rejects(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_spec(bad)


def test_unknown_family_and_name() -> None:
    with pytest.raises(InvalidInputError, match="unknown model family"):
        create_dual_encoder("nosuch:thing")
    with pytest.raises(InvalidInputError, match="unknown built-in"):
        create_dual_encoder("alignfuse:nosuch")
    with pytest.raises(InvalidInputError, match="architecture"):
        create_dual_encoder("open_clip:No-Such-Arch")
    with pytest.raises(InvalidInputError, match="precision"):
        create_dual_encoder("alignfuse:random-tiny", precision="fp8")
    with pytest.raises(InvalidInputError, match="no cross-encoder"):
        create_cross_encoder("open_clip:ViT-B-32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        create_dual_encoder("alignfuse:random-tiny", device="cuda")


def test_random_tiny_is_deterministic_and_normalised() -> None:
    a = create_dual_encoder("alignfuse:random-tiny")
    b = create_dual_encoder("alignfuse:random-tiny")
    assert isinstance(a, DualEncoder)
    assert a.info.weights_sha256 == b.info.weights_sha256
    assert a.info.weights == "random-init"
    assert a.embed_dim == 64
    texts = ["a red circle", "two blue squares left of a star"]
    ta, tb = a.encode_texts(texts), b.encode_texts(texts)
    assert ta.dtype == np.float32 and ta.shape == (2, 64)
    np.testing.assert_allclose(ta, tb, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ta, axis=1), 1.0, atol=1e-5)
    img = Image.new("RGB", (120, 90), (200, 30, 30))
    px = a.image_transform(img)
    # preprocessing comes from the model: its recorded size is what the transform produces
    assert tuple(px.shape) == (3, a.info.preprocess.image_size, a.info.preprocess.image_size)
    ia = a.encode_images(px[None])
    assert ia.shape == (1, 64)
    np.testing.assert_allclose(np.linalg.norm(ia, axis=1), 1.0, atol=1e-5)
    assert a.encode_texts([]).shape == (0, 64)


def test_missing_download_fails_fast_with_hint() -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        create_dual_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k")
    assert time.monotonic() - t0 < 20  # seconds, not a minute of retries
    assert "open_clip:ViT-B-32@laion2b_s34b_b79k" in str(err.value)
    assert "/path/to" in str(err.value)


def test_local_weights_file_roundtrip(tmp_path) -> None:
    import open_clip
    from safetensors.torch import save_file

    from alignfuse.models.builtin import RANDOM_TINY_CONFIG, _register_open_clip_config

    _register_open_clip_config("alignfuse-random-tiny", RANDOM_TINY_CONFIG)
    torch.manual_seed(123)
    model = open_clip.create_model("alignfuse-random-tiny")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    enc = create_dual_encoder(f"open_clip:alignfuse-random-tiny@{path}")
    assert enc.info.weights == str(path)
    rt = create_dual_encoder("alignfuse:random-tiny")
    assert enc.info.weights_sha256 != rt.info.weights_sha256
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer("alignfuse-random-tiny")(["a cat"]))
        ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(["a cat"]), ref, atol=1e-5)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        create_dual_encoder(f"open_clip:alignfuse-random-tiny@{tmp_path / 'missing.safetensors'}")


def test_host_probe_closed_port() -> None:
    from alignfuse.models.hub import host_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert host_reachable(f"http://127.0.0.1:{port}/x", timeout=1.0) is False


def test_list_models_names_specs() -> None:
    specs = {m.spec for m in list_models()}
    assert "alignfuse:random-tiny" in specs
    assert any(s.startswith("open_clip:ViT-B-32@") for s in specs)
