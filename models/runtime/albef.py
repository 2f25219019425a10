"""ALBEF on ONNX Runtime: the vision tower, the text layers and the fusion layers + ITM head as three ONNX
graphs, behind the same :class:`~alignfuse.models.base.DualEncoder` / ``CrossEncoder`` protocols as the
torch adapters they wrap (which they keep for what has no graph: grounding's gradients).

Graphs (all batch and text-length dimensions dynamic):

``albef-vision``  pixels [n, 3, R, R] → tokens [n, L, Dv], ITC embedding [n, E]
``albef-text``    ids, mask [n, T] (int64) → text states [n, T, D], ITC embedding [n, E]
``albef-itm``     text states [n, T, D], mask [n, T], image tokens [n, L, Dv] → ITM logits [n, 2]

The ITM graph takes aligned pairs; one text against many images (or the reverse) is broadcast here before
the call. The fusion layers' cross-attention is exported in whichever form the torch model picks at ALBEF's
text length (the folded form at base size: no K/V projection of the image tokens).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.adapters import AlbefBundle, AlbefCrossEncoder, AlbefDualEncoder
from alignfuse.models.albef.model import AlbefModel, trailing_length
from alignfuse.models.base import (
    Grounding,
    ImageStates,
    ImageTransform,
    MatchScores,
    TextStates,
    pair_count,
)
from alignfuse.models.runtime.graphs import export_module, graph_dir, graph_key, load_session


class _VisionGraph(nn.Module):
    def __init__(self, model: AlbefModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.image_tokens(pixels)
        return tokens, self.model.image_embed(tokens)


class _TextGraph(nn.Module):
    def __init__(self, model: AlbefModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.model.text_states(ids, mask)
        return states, self.model.text_embed(states)


class _ItmGraph(nn.Module):
    def __init__(self, model: AlbefModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        fused = self.model.text_encoder.forward_fusion(states, mask, image_tokens=tokens, cls_only=True)
        return self.model.itm_head(fused[:, 0, :])


class AlbefGraphs:
    """The ONNX Runtime sessions of one ALBEF bundle at one precision (built lazily, shared by the dual and
    the cross adapter of the bundle)."""

    def __init__(self, bundle: AlbefBundle, precision: str, cache_dir: str | Path | None = None) -> None:
        self.bundle = bundle
        self.precision = precision
        weights = bundle.weights if bundle.weights != "random-init" else None
        self.folder = graph_dir(weights, bundle.weights_sha256, cache_dir)
        self._sessions: dict[str, Any] = {}

    def _examples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.bundle.config
        t = cfg.max_text_len
        ids = torch.randint(1, cfg.vocab_size, (2, t), dtype=torch.long)
        mask = torch.ones(2, t, dtype=torch.long)
        mask[1, t // 2 :] = 0
        pixels = torch.randn(2, 3, cfg.image_res, cfg.image_res)
        tokens = torch.randn(2, cfg.num_image_tokens, cfg.vision_width)
        return ids, mask, pixels, tokens

    def _export(self, name: str, path: Path) -> None:
        model = self.bundle.model  # fp32 on the CPU (the onnx runtime is CPU-only)
        ids, mask, pixels, tokens = self._examples()
        n, t = {0: "n"}, {0: "n", 1: "t"}
        if name == "albef-vision":
            export_module(
                _VisionGraph(model), (pixels,), path, input_names=["pixels"],
                output_names=["tokens", "embed"], dynamic_axes={"pixels": n, "tokens": n, "embed": n},
            )  # fmt: skip
        elif name == "albef-text":
            export_module(
                _TextGraph(model), (ids, mask), path, input_names=["ids", "mask"],
                output_names=["states", "embed"],
                dynamic_axes={"ids": t, "mask": t, "states": t, "embed": n},
            )  # fmt: skip
        else:
            with torch.no_grad():
                states = model.text_states(ids, mask)
            export_module(
                _ItmGraph(model), (states, mask, tokens), path, input_names=["states", "mask", "tokens"],
                output_names=["logits"],
                dynamic_axes={"states": t, "mask": t, "tokens": n, "logits": n},
            )  # fmt: skip

    def session(self, name: str) -> Any:
        sess = self._sessions.get(name)
        if sess is None:
            key = graph_key(name, self.precision, self.bundle.weights_sha256, self.bundle.config.to_json())
            sess = load_session(self.folder, key, lambda path: self._export(name, path))
            self._sessions[name] = sess
        return sess

    def vision(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, embed = self.session("albef-vision").run(None, {"pixels": pixels})
        return tokens, embed

    def text(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        states, embed = self.session("albef-text").run(None, {"ids": ids, "mask": mask})
        return states, embed

    def itm(self, states: np.ndarray, mask: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        out = self.session("albef-itm").run(None, {"states": states, "mask": mask, "tokens": tokens})
        return np.asarray(out[0], dtype=np.float32)


_GRAPHS: weakref.WeakValueDictionary[tuple[int, str, str], AlbefGraphs] = weakref.WeakValueDictionary()


def albef_graphs(bundle: AlbefBundle, precision: str, cache_dir: str | Path | None = None) -> AlbefGraphs:
    """The shared :class:`AlbefGraphs` of ``bundle`` at ``precision`` (one per live bundle)."""
    key = (id(bundle), precision, str(cache_dir))
    graphs = _GRAPHS.get(key)
    if graphs is None or graphs.bundle is not bundle:
        graphs = AlbefGraphs(bundle, precision, cache_dir)
        _GRAPHS[key] = graphs
    return graphs


def _f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(arr, dtype=np.float32)


def _rows(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` with batch ``n`` (a batch of 1 repeated), contiguous."""
    return np.ascontiguousarray(np.broadcast_to(x, (n, *x.shape[1:]))) if x.shape[0] != n else x


class _OnnxAlbefBase:
    runtime = "onnx"

    def __init__(self, inner: AlbefDualEncoder | AlbefCrossEncoder, graphs: AlbefGraphs) -> None:
        self.inner = inner
        self.graphs = graphs
        self.info = inner.info
        self.device = torch.device("cpu")
        self.precision = graphs.precision
        self.bundle = inner.bundle

    @property
    def image_transform(self) -> ImageTransform:
        return self.inner.image_transform

    def _pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return _f32(self.inner._pixels(pixels))

    def _ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask (int64) cut after the last real token of the batch (padding changes nothing)."""
        ids, mask = self.inner._tokens(texts)
        length = trailing_length(mask)
        return ids[:, :length].numpy().astype(np.int64), mask[:, :length].numpy().astype(np.int64)


class OnnxAlbefDualEncoder(_OnnxAlbefBase):
    """:class:`AlbefDualEncoder` on ONNX Runtime (``albef-vision`` and ``albef-text`` graphs)."""

    def __init__(self, inner: AlbefDualEncoder, graphs: AlbefGraphs) -> None:
        super().__init__(inner, graphs)
        self.dual = inner
        graphs.session("albef-text")
        graphs.session("albef-vision")

    @property
    def embed_dim(self) -> int:
        return self.dual.embed_dim

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.graphs.vision(self._pixels(pixels))[1]

    def encode_images_with_tokens(self, pixels: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        tokens, embed = self.graphs.vision(self._pixels(pixels))
        return embed, torch.from_numpy(tokens).to(torch.float16)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.graphs.text(*self._ids(texts))[1]


class OnnxAlbefCrossEncoder(_OnnxAlbefBase):
    """:class:`AlbefCrossEncoder` on ONNX Runtime (``albef-text``, ``albef-vision``, ``albef-itm``)."""

    def __init__(self, inner: AlbefCrossEncoder, graphs: AlbefGraphs) -> None:
        super().__init__(inner, graphs)
        self.cross = inner
        self.max_pairs = inner.max_pairs
        for name in ("albef-text", "albef-itm", "albef-vision"):
            graphs.session(name)

    def text_states(self, texts: Sequence[str]) -> TextStates:
        ids, mask = self._ids(texts)
        states = self.graphs.text(ids, mask)[0]
        return TextStates(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(states))

    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        return ImageStates(torch.from_numpy(self.graphs.vision(self._pixels(pixels))[0]))

    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        cfg = self.bundle.config
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (cfg.num_image_tokens, cfg.vision_width):
            raise InvalidInputError(
                f"expected image tokens [n, {cfg.num_image_tokens}, {cfg.vision_width}], got {tuple(tokens.shape)}"
            )
        return ImageStates(tokens.to("cpu", torch.float32))

    def score(self, text: TextStates, images: ImageStates) -> MatchScores:
        n = pair_count(text, images)
        if n == 0:
            return MatchScores(np.zeros(0, np.float32), np.zeros(0, np.float32))
        nt, ni = len(text), len(images)
        mask_t = text.mask.to("cpu")
        length = trailing_length(mask_t)
        mask = mask_t[:, :length].numpy().astype(np.int64)
        if text.hidden is None:
            states = self.graphs.text(text.ids[:, :length].cpu().numpy().astype(np.int64), mask)[0]
        else:
            states = _f32(text.hidden[:, :length])
        tokens = _f32(images.tokens)
        outs = []
        for start in range(0, n, self.max_pairs):
            stop = min(n, start + self.max_pairs)
            m = stop - start
            s, k = (states, mask) if nt == 1 else (states[start:stop], mask[start:stop])
            tok = tokens if ni == 1 else tokens[start:stop]
            outs.append(self.graphs.itm(_rows(s, m), _rows(k, m), _rows(tok, m)))
        logits = np.concatenate(outs)
        prob = torch.from_numpy(logits).softmax(dim=-1)[:, 1].numpy()
        return MatchScores(np.ascontiguousarray(logits[:, 1]), prob.astype(np.float32))

    def grounding(self, text: str, pixels: torch.Tensor, *, layer: int | None = None) -> Grounding:
        """Grad-CAM needs gradients: computed by the torch model this adapter wraps."""
        return self.cross.grounding(text, pixels, layer=layer)
