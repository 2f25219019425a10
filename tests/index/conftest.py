"""Shared fixtures of the index tests: the real random-tiny dual encoder, a counting wrapper, a tiny fake
cross-encoder, images drawn with PIL, clustered synthetic vectors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from alignfuse.models.base import DualEncoder, ImageStates, MatchScores, ModelInfo, Preprocess, TextStates

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_encoder() -> DualEncoder:
    """The real ``alignfuse:random-tiny`` open_clip model (deterministic random init, embed 64)."""
    from alignfuse.models.registry import create_dual_encoder

    torch.set_num_threads(1)
    return create_dual_encoder("alignfuse:random-tiny")


class CountingEncoder:
    """Wraps a real DualEncoder and counts the items it encodes."""

    def __init__(self, inner: DualEncoder) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = inner.device
        self.images_encoded = 0
        self.texts_encoded = 0
        self.image_calls = 0

    @property
    def embed_dim(self) -> int:
        return self.inner.embed_dim

    @property
    def image_transform(self):  # type: ignore[no-untyped-def]
        return self.inner.image_transform

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        self.images_encoded += int(pixels.shape[0])
        self.image_calls += 1
        return self.inner.encode_images(pixels)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts_encoded += len(texts)
        return self.inner.encode_texts(texts)


@pytest.fixture
def counting(tiny_encoder: DualEncoder) -> CountingEncoder:
    return CountingEncoder(tiny_encoder)


class FakeCrossEncoder:
    """A tiny deterministic CrossEncoder: its image tokens are a fixed projection of 8x8 pooled pixels."""

    def __init__(self, spec: str = "test:fake-cross", sha: str = "c" * 64) -> None:
        pre = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.info = ModelInfo(spec, "test", "fake", "random-init", sha, 16, pre)
        self.device = torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3, 16, generator=g)

    @property
    def image_transform(self):  # type: ignore[no-untyped-def]
        def t(img: Image.Image) -> torch.Tensor:
            a = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32) / 255.0
            return torch.from_numpy(a).permute(2, 0, 1)

        return t

    def text_states(self, texts: Sequence[str]) -> TextStates:
        n = len(texts)
        return TextStates(torch.zeros(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long))

    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)  # [n, 3, 4, 4]
        tokens = pooled.flatten(2).transpose(1, 2) @ self.proj  # [n, 16, 16]
        return ImageStates(tokens)

    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        return ImageStates(tokens.float())

    def score(self, text: TextStates, images: ImageStates) -> MatchScores:
        n = len(images)
        return MatchScores(np.zeros(n, np.float32), np.full(n, 0.5, np.float32))


def other_info(info: ModelInfo, **changes: object) -> ModelInfo:
    return replace(info, **changes)  # type: ignore[arg-type]


def draw_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A small deterministic picture (background colour + a shape) saved by extension (JPEG/PNG)."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
    box = (x0, y0, x0 + size[0] // 3, y0 + size[1] // 3)
    (d.ellipse if seed % 2 else d.rectangle)(box, fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img.save(path, fmt)
    return path


def make_image_folder(root: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` images, alternating JPEG/PNG, some in a subfolder, some with upper-case extensions."""
    paths = []
    for i in range(start, start + n):
        ext = [".jpg", ".png", ".JPG", ".jpeg"][i % 4]
        sub = "sub" if i % 3 == 0 else ""
        paths.append(draw_image(root / sub / f"img{i:04d}{ext}", seed=i))
    return paths


def clustered(n: int, d: int, clusters: int = 32, seed: int = 0, noise: float = 0.15) -> np.ndarray:
    """L2-normalised vectors around random centres (a realistic ANN workload, unlike pure Gaussian)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(ids: np.ndarray, vecs: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (ties by id) with numpy."""
    s = q @ vecs.T
    out_i, out_s = [], []
    for row in s:
        order = np.lexsort((ids, -row))[:k]
        out_i.append(ids[order])
        out_s.append(row[order])
    return np.array(out_i), np.array(out_s)
