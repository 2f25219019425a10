"""ViLT (Kim et al., 2021), the single-stream cross-encoder, through ``transformers``
(``ViltForImageAndTextRetrieval`` + ``ViltProcessor``).

Specs: ``vilt:dandelin/vilt-b32-finetuned-coco`` (also ``-flickr30k``) or ``vilt:/path/to/dir`` (a
``save_pretrained`` directory holding the model and its processor).

Where ALBEF aligns a unimodal image encoder and text encoder before fusing them, ViLT feeds word embeddings
and linearly embedded 32×32 patches into *one* transformer. There is no vision tower whose output could be
computed once per image and reused, so:

* :class:`ModelInfo` says ``image_states_cacheable=False``: the engine keeps no feature cache and no token
  LRU for it, and the builder refuses ``--rerank-cache``;
* :class:`ImageStates` carry the preprocessed pixels themselves (:class:`ViltTransform`), and every pair is
  one full pass of the transformer over words + patches (:meth:`ViltCrossEncoder.score`).

Preprocessing is ViLT's own (the saved ``ViltImageProcessor``): bicubic resize of the shorter side to 384
(longer side ≤ 640, both multiples of 32), ImageNet-standard mean/std 0.5. Images of different shapes are
placed top-left on a fixed square canvas with a fourth channel holding ViLT's ``pixel_mask``; ViLT's patch
embedding interpolates its position embeddings to each image's own patch grid and attends to valid patches
only, so the padding changes nothing (:meth:`~ViltCrossEncoder.score` also trims it away before the forward).
Texts go through the processor's tokenizer (lower-casing WordPiece, ``[CLS] ... [SEP]``), 40 tokens at most.

The retrieval head is one logit per pair (``rank_output``); the match probability is its sigmoid.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import (
    Grounding,
    ImageStates,
    ImageTransform,
    MatchScores,
    ModelInfo,
    Precision,
    Preprocess,
    TextStates,
    pair_count,
    torch_dtype,
)
from alignfuse.models.blip import _hub_cached, _weights_sha256, locate_pretrained
from alignfuse.models.registry import ModelEntry, ModelSpec, register_family

logger = logging.getLogger(__name__)

VILT_MODELS = {
    "dandelin/vilt-b32-finetuned-coco": "ViLT-B/32 single-stream ITM fine-tuned on COCO retrieval",
    "dandelin/vilt-b32-finetuned-flickr30k": "ViLT-B/32 single-stream ITM fine-tuned on Flickr30K retrieval",
}
#: ViLT's text length (its position embeddings stop at 40)
MAX_TEXT_LEN = 40
#: the longer side ViLT allows for a given shorter side (DETR's 800 / 1333 ratio)
_LONGER_RATIO = 1333 / 800


def _locate(spec: ModelSpec) -> tuple[str, bool]:
    return locate_pretrained(spec, family="vilt", label="ViLT", example="dandelin/vilt-b32-finetuned-coco")


class ViltTransform:
    """PIL image → float [4, S, S]: ViLT's own preprocessing (its image processor, unpadded) placed top-left
    on an S×S canvas; channel 3 is the pixel mask (1 on the image, 0 on padding)."""

    def __init__(self, image_processor: Any, canvas: int) -> None:
        self.image_processor = image_processor
        self.canvas = canvas

    def __call__(self, image: Image.Image) -> torch.Tensor:
        try:
            px = self.image_processor(images=image.convert("RGB"), do_pad=False, return_tensors="pt")
        except ValueError as exc:  # e.g. an aspect ratio so extreme that ViLT's rounding leaves 0 px
            raise InvalidInputError(
                f"ViLT cannot preprocess a {image.width}x{image.height} image: {exc}"
            ) from exc
        img = torch.as_tensor(px["pixel_values"][0], dtype=torch.float32)  # [3, h, w]
        h, w = int(img.shape[1]), int(img.shape[2])
        if h > self.canvas or w > self.canvas:  # pragma: no cover - the canvas is the processor's maximum
            raise InvalidInputError(f"ViLT preprocessing gave {h}x{w}, over the canvas {self.canvas}")
        out = torch.zeros(4, self.canvas, self.canvas)
        out[:3, :h, :w] = img
        out[3, :h, :w] = 1.0
        return out


@dataclass
class ViltBundle:
    model: Any  # transformers.ViltForImageAndTextRetrieval
    processor: Any  # transformers.ViltProcessor
    preprocess: Preprocess
    canvas: int
    patch_size: int
    device: torch.device
    dtype: torch.dtype
    weights: str
    weights_sha256: str


_SHARED: weakref.WeakValueDictionary[tuple[str, str, str], ViltBundle] = weakref.WeakValueDictionary()


def load_vilt(spec: ModelSpec, device: torch.device, precision: Precision) -> ViltBundle:
    """Load (or reuse, while alive) the ViLT retrieval model and processor named by ``spec``."""
    key = (spec.name, str(device), precision)
    hit = _SHARED.get(key)
    if hit is not None:
        return hit
    from transformers import ViltForImageAndTextRetrieval, ViltProcessor

    source, local_only = _locate(spec)
    try:
        processor = ViltProcessor.from_pretrained(source, local_files_only=local_only)
        model: Any = ViltForImageAndTextRetrieval.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{spec.raw}: cannot load ViLT from {source}: {exc}") from exc
    if (
        len(processor.tokenizer) < 10
    ):  # transformers falls back to a 5-token vocabulary when files are missing
        raise ModelUnavailableError(f"{spec.raw}: the tokenizer in {source} has no real vocabulary")
    ip = processor.image_processor
    size = ip.size
    shorter = int(size.get("shortest_edge") if hasattr(size, "get") else size.shortest_edge)
    divisor = int(getattr(ip, "size_divisor", None) or 1)
    canvas = max(shorter, int(_LONGER_RATIO * shorter)) // divisor * divisor
    pre = Preprocess(
        image_size=shorter,
        mean=tuple(float(x) for x in ip.image_mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in ip.image_std),  # type: ignore[arg-type]
        interpolation="bicubic",
        resize_mode="shortest",
        center_crop=False,
    )
    dtype = torch.float32 if device.type == "cpu" else torch_dtype(precision)
    if device.type == "cpu" and precision != "fp32":
        logger.warning("%s: %s on CPU is slow here; running fp32", spec.raw, precision)
    weights, digest = _weights_sha256(source, model)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    bundle = ViltBundle(
        model, processor, pre, canvas, int(model.config.patch_size), device, dtype, weights, digest
    )
    _SHARED[key] = bundle
    return bundle


class ViltCrossEncoder:
    """ViLT ITM reranker behind the :class:`~alignfuse.models.base.CrossEncoder` protocol. Text states are
    token ids + mask only; image states are canvases of pixels (no vision tower to cache); ``score`` runs
    the whole transformer per pair, ``max_pairs`` pairs per forward."""

    def __init__(self, bundle: ViltBundle, info: ModelInfo, *, max_pairs: int = 32) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.info = info
        self.device = bundle.device
        self.max_pairs = max_pairs
        self.max_text_len = min(MAX_TEXT_LEN, int(bundle.model.config.max_position_embeddings))
        self._transform = ViltTransform(bundle.processor.image_processor, bundle.canvas)

    @property
    def image_transform(self) -> ImageTransform:
        return self._transform

    @torch.inference_mode()
    def text_states(self, texts: Sequence[str]) -> TextStates:
        if isinstance(texts, str):
            raise InvalidInputError("pass a list of strings, not one string")
        cleaned = [t.strip() for t in texts]
        if any(not t for t in cleaned):
            raise InvalidInputError("empty text")
        enc = self.bundle.processor.tokenizer(
            cleaned, padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return TextStates(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), None)

    def _canvases(self, pixels: torch.Tensor) -> torch.Tensor:
        c = self.bundle.canvas
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (4, c, c):
            raise InvalidInputError(
                f"expected ViLT canvases [n, 4, {c}, {c}] (its image_transform), got {tuple(pixels.shape)}"
            )
        return pixels.to(self.device, dtype=self.bundle.dtype)

    @torch.inference_mode()
    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        """No vision tower: the states are the canvases themselves."""
        return ImageStates(self._canvases(pixels))

    @torch.inference_mode()
    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        if tokens.ndim == 3:
            raise InvalidInputError(
                f"{self.info.spec}: ViLT has no cacheable image tokens (single-stream: patches and words "
                "enter one transformer); pass the pixels of its image_transform"
            )
        return ImageStates(self._canvases(tokens))

    def _trimmed(self, canvases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [n, 3, H, W], pixel_mask [n, H, W]) with the padding no image of the batch uses
        cut off (H, W rounded up to the patch size)."""
        mask = canvases[:, 3] > 0.5
        p = self.bundle.patch_size
        rows = int(mask.any(dim=2).sum(dim=1).max())
        cols = int(mask.any(dim=1).sum(dim=1).max())
        c = canvases.shape[-1]
        h, w = min(c, -(-rows // p) * p), min(c, -(-cols // p) * p)
        return canvases[:, :3, :h, :w], mask[:, :h, :w].long()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, canvases: torch.Tensor) -> torch.Tensor:
        px, pmask = self._trimmed(canvases)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            token_type_ids=torch.zeros_like(ids),
            pixel_values=px,
            pixel_mask=pmask,
        )
        return out.logits[:, 0].float()

    @torch.inference_mode()
    def score(self, text: TextStates, images: ImageStates) -> MatchScores:
        n = pair_count(text, images)  # InvalidInputError unless equal batches or one side 1
        nt, ni = len(text), len(images)
        if n == 0:
            return MatchScores(np.zeros(0, np.float32), np.zeros(0, np.float32))
        ids, mask = text.ids.to(self.device), text.mask.to(self.device)
        canvases = self._canvases(images.tokens)
        outs = []
        for start in range(0, n, self.max_pairs):
            stop = min(n, start + self.max_pairs)
            m = stop - start
            i_ids = ids.expand(m, -1) if nt == 1 else ids[start:stop]
            i_mask = mask.expand(m, -1) if nt == 1 else mask[start:stop]
            cv = canvases.expand(m, -1, -1, -1) if ni == 1 else canvases[start:stop]
            outs.append(self._forward(i_ids, i_mask, cv))
        logits = torch.cat(outs)
        return MatchScores(logits.cpu().numpy(), torch.sigmoid(logits).cpu().numpy())

    def grounding(self, text: str, pixels: torch.Tensor, *, layer: int | None = None) -> Grounding:
        raise InvalidInputError(
            f"{self.info.spec}: grounding is not supported for ViLT: a single-stream transformer has no "
            "cross-attention from words to image patches to explain (use an ALBEF or BLIP reranker)",
            detail={"reranker": self.info.spec, "family": "vilt", "supported_families": ["albef", "blip"]},
        )


def _info(spec: ModelSpec, bundle: ViltBundle) -> ModelInfo:
    return ModelInfo(
        spec=spec.raw,
        family="vilt",
        arch=spec.name,
        weights=bundle.weights,
        weights_sha256=bundle.weights_sha256,
        embed_dim=int(bundle.model.config.hidden_size),
        preprocess=bundle.preprocess,
        description=VILT_MODELS.get(spec.name, f"ViLT retrieval model from {spec.name}") + " (cross)",
        extra=(("kind", "cross"), ("max_text_len", str(MAX_TEXT_LEN)), ("canvas", str(bundle.canvas))),
        default_fusion="itm",
        image_states_cacheable=False,
    )


def vilt_cross(spec: ModelSpec, device: torch.device, precision: Precision) -> ViltCrossEncoder:
    bundle = load_vilt(spec, device, precision)
    return ViltCrossEncoder(bundle, _info(spec, bundle))


def vilt_known() -> list[ModelEntry]:
    return [
        ModelEntry(f"vilt:{repo}", "cross", desc, _hub_cached(repo) is not None)
        for repo, desc in VILT_MODELS.items()
    ]


register_family("vilt", cross=vilt_cross, known=vilt_known)
