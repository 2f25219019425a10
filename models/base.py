"""Protocols and value types shared by every model family.

A *dual encoder* embeds images and texts independently into one L2-normalised space (stage 1).
A *cross-encoder* reads a (text, image) pair together and scores whether they match (stage 2); its API is
split so text states and image states are computed once each and reused across many pairs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError

#: ``int8``: dynamically quantized weights (int8 matmuls, float activations), CPU only
Precision = Literal["fp32", "fp16", "bf16", "int8"]
ResizeMode = Literal["squash", "shortest", "longest"]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")

#: what a caller may ask for: a precision, or ``auto``: bf16 on a CPU with native bf16 for models big enough
#: that it pays (``models.runtime.AUTO_MIN_PARAMS``) whose adapters run it fast there (ALBEF); fp32 elsewhere
PrecisionChoice = Literal["auto", "fp32", "fp16", "bf16", "int8"]
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)

#: what executes a model: ``torch`` (eager PyTorch), ``onnx`` (graphs exported to ONNX, run by ONNX Runtime,
#: CPU), ``auto`` (ONNX Runtime on a CPU for models big enough that it pays, else torch)
Runtime = Literal["torch", "onnx", "auto"]
RUNTIMES: tuple[str, ...] = ("torch", "onnx", "auto")

#: the pixel normalisation of OpenAI's CLIP, which ALBEF, BLIP and the shipped scenes models reuse
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Fusion = Literal["itm", "itm+itc", "itm+itc_logit"]
#: how a reranked candidate's sort key combines the cross-encoder's ITM "match" logit with the dual encoder's
#: cosine: ``itm`` the logit alone (ALBEF); ``itm+itc`` logit + cosine (BLIP/LAVIS); ``itm+itc_logit`` logit +
#: the ITC *logit*, cosine × the dual encoder's learned logit scale (1 / temperature): both terms on the logit
#: scale their heads were trained on, where a cosine alone (a few hundredths between candidates) barely counts.
FUSIONS: tuple[str, ...] = ("itm", "itm+itc", "itm+itc_logit")


def default_fusion_for(reranker_default: str, itc_logit_scale: float | None) -> str:
    """The fusion a search or evaluation runs when none is asked for: the reranker's own default, except that
    ``itm+itc_logit`` becomes ``itm+itc`` with a dual encoder that has no logit scale (the nearest it supports).
    """
    fusion = reranker_default if reranker_default in FUSIONS else "itm"
    if fusion == "itm+itc_logit" and itc_logit_scale is None:
        return "itm+itc"
    return fusion


def check_fusion(fusion: str, itc_logit_scale: float | None) -> Fusion:
    """``fusion`` when it is one of :data:`FUSIONS` that the dual encoder supports (``itm+itc_logit`` needs its
    learned logit scale), else InvalidInputError with the allowed values as detail. The one fusion check."""
    if fusion not in FUSIONS:
        raise InvalidInputError(
            f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}",
            detail={"field": "fusion", "allowed": list(FUSIONS)},
        )
    if fusion == "itm+itc_logit" and (itc_logit_scale is None or not itc_logit_scale > 0):
        raise InvalidInputError(
            "fusion itm+itc_logit needs a dual encoder with a learned logit scale (temperature); the dual "
            "encoder has none",
            detail={"field": "fusion", "allowed": [f for f in FUSIONS if f != "itm+itc_logit"]},
        )
    return fusion  # type: ignore[return-value]


def fuse_scores(
    itm_logit: np.ndarray, itc_cosine: np.ndarray, fusion: str, itc_logit_scale: float | None = None
) -> np.ndarray:
    """The sort key of reranked candidates under ``fusion`` (see :data:`FUSIONS`, :func:`check_fusion`), float32."""
    check_fusion(fusion, itc_logit_scale)
    logit = np.asarray(itm_logit, dtype=np.float32)
    if fusion == "itm":
        return logit
    cos = np.asarray(itc_cosine, dtype=np.float32)
    if fusion == "itm+itc":
        return logit + cos
    assert itc_logit_scale is not None  # itm+itc_logit (check_fusion)
    return logit + cos * np.float32(itc_logit_scale)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX or AVX512-BF16), where bf16 autocast on the CPU
    is several times faster than fp32 (elsewhere oneDNN emulates it, slower than fp32)."""
    return _cpu_bf16_flags()


@functools.cache
def _cpu_bf16_flags() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and bool(fn()):
                return True
        except RuntimeError:  # pragma: no cover - torch builds without the probe
            continue
    return False


def cpu_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """The autocast context a model's forward passes run in on the CPU: bf16 when ``precision`` is bf16 and
    the CPU has native bf16 (:func:`cpu_has_native_bf16`; weights stay fp32, matmuls run in bf16), else none.
    """
    if device.type == "cpu" and precision == "bf16" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def torch_dtype(precision: Precision) -> torch.dtype:
    """The floating dtype of a model's parameters and activations (int8 models keep float32 activations)."""
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}[
        precision
    ]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. Recorded in a collection's manifest."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: ResizeMode = "shortest"  # "squash": resize to size x size ignoring aspect (ALBEF/BLIP)
    center_crop: bool = True


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model. ``weights_sha256`` changes whenever the weights do."""

    spec: str
    family: str
    arch: str
    weights: str  # pretrained tag, file path, hub id, or "random-init"
    weights_sha256: str
    embed_dim: int
    preprocess: Preprocess
    description: str = ""
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: cross-encoders: the score fusion used when a request names none. ALBEF ranks by the ITM logit
    #: ("itm"), BLIP/LAVIS by logit + ITC cosine ("itm+itc"); a shipped model's choice is measured.
    default_fusion: str = "itm"
    #: dual encoders: the learned contrastive logit scale (1 / temperature; CLIP's ``logit_scale.exp()``,
    #: ALBEF's ``1 / temp``), the factor that turns a cosine into a logit; None where the weights lack it
    itc_logit_scale: float | None = None
    #: cross-encoders: whether image states exist apart from the text (ALBEF's vision tokens, BLIP's vision
    #: output) and may be cached per image (feature cache, token LRU). False for single-stream models (ViLT):
    #: patches and words enter one transformer together, so every pair is a full pass from the pixels.
    image_states_cacheable: bool = True

    @property
    def id(self) -> str:
        return f"{self.spec}#{self.weights_sha256[:12]}"


ImageTransform = Callable[[Image.Image], torch.Tensor]


@runtime_checkable
class DualEncoder(Protocol):
    """Stage-1 model. Both encode methods return float32 numpy arrays [n, embed_dim], L2-normalised."""

    info: ModelInfo
    device: torch.device

    @property
    def embed_dim(self) -> int: ...

    @property
    def image_transform(self) -> ImageTransform: ...

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """``pixels``: a batch already passed through ``image_transform`` (float [n, 3, H, W])."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class TextStates:
    """Per-text states a cross-encoder computes once and reuses across pairs.

    ``ids``/``mask`` are token ids and the attention mask [n, T]; ``hidden`` the unimodal text states [n, T, D]
    where the model has them (ALBEF: text layer 5), else None (BLIP runs its whole text tower per pair).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> TextStates:
        idx = torch.as_tensor(index, dtype=torch.long, device=self.ids.device)
        return TextStates(self.ids[idx], self.mask[idx], None if self.hidden is None else self.hidden[idx])


@dataclass
class ImageStates:
    """Per-image states: the vision tower's output tokens [n, L, D] (what the feature cache stores, fp16),
    plus an optional model-specific cache of cross-attention key/value projections derived from them."""

    tokens: torch.Tensor
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> ImageStates:
        idx = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        kv = None if self.kv is None else tuple((k[idx], v[idx]) for k, v in self.kv)
        return ImageStates(self.tokens[idx], kv)


@dataclass(frozen=True)
class MatchScores:
    """Cross-encoder output per pair: the ITM logit of the "match" class (the score fusions of
    :func:`fuse_scores` add to it) and the match probability (softmax over the two ITM classes)."""

    logit: np.ndarray  # float32 [n]: logit of class 1 ("match")
    prob: np.ndarray  # float32 [n]: softmax(logits)[:, 1]


def pair_count(text: TextStates, images: ImageStates) -> int:
    """How many pairs ``CrossEncoder.score(text, images)`` scores: equal batches pair up, a batch of 1
    broadcasts. Raises InvalidInputError otherwise (the one place this rule lives)."""
    nt, ni = len(text), len(images)
    if nt == 0 or ni == 0:
        return 0
    if nt != ni and 1 not in (nt, ni):
        raise InvalidInputError(f"cannot pair {nt} texts with {ni} images (need equal counts or one side 1)")
    return max(nt, ni)


@runtime_checkable
class CrossEncoder(Protocol):
    """Stage-2 model (ITM head).

    ``score(text, images)`` scores pairs: either side may have batch 1 (broadcast) or both batch n (aligned
    pairs). One batched forward, no Python loop over pairs.
    """

    info: ModelInfo
    device: torch.device

    @property
    def image_transform(self) -> ImageTransform: ...

    def text_states(self, texts: Sequence[str]) -> TextStates: ...

    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        """Vision tower over transformed pixels; includes the K/V cache when enabled."""
        ...

    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        """Rebuild states from cached vision tokens (e.g. fp16 from the feature cache)."""
        ...

    def score(self, text: TextStates, images: ImageStates) -> MatchScores: ...


# ---------------------------------------------------------------------------------------------- grounding
@dataclass(frozen=True)
class Grounding:
    """Where a cross-encoder looks for each word of a caption (ALBEF's Grad-CAM on cross-attention).

    ``heatmaps[w]`` is a non-negative float32 grid [rows, cols] over the image's patches (row-major, top
    left first; the grid covers the whole transformed image, i.e. the original image for squash resizing):
    the cross-attention of word ``w``'s tokens to each patch at fusion layer ``layer``, times the positive
    part of the gradient of the ITM "match" logit with respect to that attention, averaged over heads and
    summed over the word's word pieces. ``tokens`` are the word pieces in order and ``word_of_token`` the
    index of the word each belongs to."""

    words: tuple[str, ...]
    heatmaps: np.ndarray  # float32 [n_words, rows, cols]
    tokens: tuple[str, ...]
    word_of_token: tuple[int, ...]
    layer: int
    logit: float
    prob: float

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.heatmaps.shape[1]), int(self.heatmaps.shape[2])


@runtime_checkable
class GroundingModel(Protocol):
    """A cross-encoder that can explain its ITM score (:class:`Grounding`). ``layer`` indexes the fusion
    layers (0 = the first layer with cross-attention); None = the model's default."""

    def grounding(self, text: str, pixels: torch.Tensor, *, layer: int | None = None) -> Grounding: ...


def merge_word_pieces(pieces: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """WordPiece tokens → (words, word index of each token): a ``##`` piece continues the previous word.

    >>> merge_word_pieces(["a", "tri", "##ang", "##le"])
    (('a', 'triangle'), (0, 1, 1, 1))
    """
    words: list[str] = []
    owner: list[int] = []
    for piece in pieces:
        if piece.startswith("##") and words:
            words[-1] += piece[2:]
        else:
            words.append(piece)
        owner.append(len(words) - 1)
    return tuple(words), tuple(owner)


def heatmaps_per_word(token_maps: np.ndarray, word_of_token: Sequence[int], n_words: int) -> np.ndarray:
    """Sum per-token heatmaps [T, rows, cols] into per-word heatmaps [n_words, rows, cols] (float32)."""
    out = np.zeros((n_words, *token_maps.shape[1:]), dtype=np.float32)
    for t, w in enumerate(word_of_token):
        out[w] += token_maps[t]
    return out
