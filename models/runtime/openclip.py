"""open_clip on ONNX Runtime: the image tower and the text tower as two ONNX graphs behind the
:class:`~alignfuse.models.base.DualEncoder` protocol.

``clip-image``  pixels [n, 3, H, W] → L2-normalised embedding [n, E]
``clip-text``   token ids [n, T] (int64) → L2-normalised embedding [n, E]

For a standard causal CLIP text tower with end-of-text pooling the text graph takes any length ``T`` up to
the context length, and a batch is cut after its longest text before the call (as the torch adapter does:
a short query costs ~10 positions instead of 77); other text towers take the full context.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from alignfuse.errors import InvalidInputError
from alignfuse.models.base import ImageTransform
from alignfuse.models.openclip import OpenClipDualEncoder
from alignfuse.models.runtime.graphs import export_module, graph_dir, graph_key, load_session


def text_trimmable(model: Any) -> bool:
    """Whether the text tower is causal with ``argmax`` (end-of-text) pooling, built of standard residual
    blocks: padding after the longest text of a batch then changes nothing, and the graph may take a shorter
    sequence."""
    from open_clip.transformer import ResidualAttentionBlock

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and all(
            type(r) is ResidualAttentionBlock
            and isinstance(r.attn, nn.MultiheadAttention)
            and r.attn.in_proj_weight is not None
            and not hasattr(r, "ln_1_kv")
            for r in model.transformer.resblocks
        )
    )


def _causal_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` over batch-first ``x`` [n, t, d] with a causal mask, written
    with ``scaled_dot_product_attention`` (``nn.MultiheadAttention``'s traced reshapes fix the length)."""
    attn = block.attn
    n, t, d = x.shape
    h = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
    x = x + block.ls_1(attn.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class _ImageGraph(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class _TrimmedTextGraph(nn.Module):
    """``encode_text`` over a sequence of any length <= the context (causal tower, argmax pooling)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        t = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:t]
        for block in m.transformer.resblocks:
            x = _causal_block(block, x)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        proj = m.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


class _TextGraph(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


class OnnxOpenClipDualEncoder:
    """:class:`OpenClipDualEncoder` on ONNX Runtime (CPU). Keeps the torch adapter for its tokenizer and
    transform."""

    runtime = "onnx"

    def __init__(
        self, inner: OpenClipDualEncoder, precision: str, cache_dir: str | Path | None = None
    ) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = torch.device("cpu")
        self.precision = precision
        self.trimmed = text_trimmable(inner.model)
        weights = inner.info.weights if Path(inner.info.weights).is_file() else None
        self.folder = graph_dir(weights, inner.info.weights_sha256, cache_dir)
        arch = f"{inner.info.arch};trimmed={self.trimmed}"
        self._image = load_session(
            self.folder,
            graph_key("clip-image", precision, inner.info.weights_sha256, arch),
            self._export_image,
        )
        self._text = load_session(
            self.folder, graph_key("clip-text", precision, inner.info.weights_sha256, arch), self._export_text
        )

    def _export_image(self, path: Path) -> None:
        size = self.info.preprocess.image_size
        pixels = torch.randn(2, 3, size, size)
        export_module(
            _ImageGraph(self.inner.model), (pixels,), path, input_names=["pixels"], output_names=["embed"],
            dynamic_axes={"pixels": {0: "n"}, "embed": {0: "n"}},
        )  # fmt: skip

    def _export_text(self, path: Path) -> None:
        tokens = self.inner.tokenizer(["a photo of a cat", "x"]).to(torch.long)
        if self.trimmed:
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]  # trace below the context length
            module: nn.Module = _TrimmedTextGraph(self.inner.model)
            axes = {"tokens": {0: "n", 1: "t"}, "embed": {0: "n"}}
        else:
            module = _TextGraph(self.inner.model)
            axes = {"tokens": {0: "n"}, "embed": {0: "n"}}
        export_module(
            module, (tokens,), path, input_names=["tokens"], output_names=["embed"], dynamic_axes=axes
        )

    @property
    def embed_dim(self) -> int:
        return self.inner.embed_dim

    @property
    def image_transform(self) -> ImageTransform:
        return self.inner.image_transform

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        if pixels.ndim != 4:
            raise InvalidInputError(f"expected a pixel batch [n, 3, H, W], got shape {tuple(pixels.shape)}")
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        arr = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        return np.asarray(self._image.run(None, {"pixels": arr})[0], dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        tokens = self.inner.tokenizer(list(texts)).to(torch.long)
        if self.trimmed:
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        out = self._text.run(None, {"tokens": np.ascontiguousarray(tokens.numpy())})[0]
        return np.asarray(out, dtype=np.float32)
