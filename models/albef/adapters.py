"""ALBEF behind the project's protocols: :class:`AlbefDualEncoder` (ITC embeddings) and
:class:`AlbefCrossEncoder` (ITM reranker). Both may share one loaded :class:`AlbefModel`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.checkpoint import LoadReport, load_albef_checkpoint
from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.model import AlbefModel
from alignfuse.models.base import (
    CLIP_MEAN,
    CLIP_STD,
    Grounding,
    ImageStates,
    ImageTransform,
    MatchScores,
    ModelInfo,
    Precision,
    Preprocess,
    TextStates,
    cpu_autocast,
    cpu_has_native_bf16,
    heatmaps_per_word,
    merge_word_pieces,
    pair_count,
    torch_dtype,
)
from alignfuse.models.text import AlbefTokenizer

logger = logging.getLogger(__name__)


def albef_preprocess(config: AlbefConfig) -> Preprocess:
    """ALBEF's test-time preprocessing: bicubic squash to ``image_res`` (no crop), CLIP mean/std."""
    return Preprocess(
        image_size=config.image_res,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        interpolation="bicubic",
        resize_mode="squash",
        center_crop=False,
    )


class SquashTransform:
    """PIL image → float tensor [3, R, R]: RGB, bicubic resize to R×R ignoring aspect, [0,1], normalise."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self._mean = torch.tensor(preprocess.mean).view(3, 1, 1)
        self._std = torch.tensor(preprocess.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.preprocess.image_size
        img = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (arr - self._mean) / self._std


@dataclass
class AlbefBundle:
    """One loaded model + tokenizer + identity, shared by the dual and cross adapters."""

    model: AlbefModel
    tokenizer: AlbefTokenizer
    config: AlbefConfig
    device: torch.device
    precision: Precision
    weights: str
    weights_sha256: str
    report: LoadReport | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def info(self, spec: str, arch: str, description: str, *, kind: str) -> ModelInfo:
        return ModelInfo(
            spec=spec,
            family="albef",
            arch=arch,
            weights=self.weights,
            weights_sha256=self.weights_sha256,
            embed_dim=self.config.embed_dim,
            preprocess=albef_preprocess(self.config),
            description=description,
            extra=(("kind", kind), ("max_text_len", str(self.config.max_text_len))),
            itc_logit_scale=1.0 / float(self.model.temp.detach().float().clamp(0.001, 0.5)),
        )


def _effective_precision(device: torch.device, precision: Precision) -> Precision:
    """What runs: on a CPU, fp32, or bf16 autocast where the CPU has native bf16 (AMX / AVX512-BF16)."""
    if device.type == "cpu" and precision != "fp32":
        if precision == "bf16" and cpu_has_native_bf16():
            return "bf16"
        logger.warning("ALBEF: %s on this CPU is slower than fp32; running fp32 instead", precision)
        return "fp32"
    return precision


def _model_dtype(device: torch.device, precision: Precision) -> torch.dtype:
    # a CPU keeps fp32 weights: its bf16 runs as autocast (AlbefBundle.amp)
    return torch.float32 if device.type == "cpu" else torch_dtype(precision)


def build_albef(
    config: AlbefConfig,
    weights_path: str | Path | None,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    *,
    seed: int = 0,
    spec: str = "albef",
) -> AlbefBundle:
    """Build an eval-mode :class:`AlbefModel` on ``device``/``precision``: weights from ``weights_path`` (any
    format :func:`load_albef_checkpoint` accepts), or random init with ``seed`` when None (logged)."""
    from alignfuse.models.hub import sha256_file, sha256_state_dict

    dev = torch.device(device)
    tokenizer = AlbefTokenizer(config.vocab, max_len=config.max_text_len)
    if tokenizer.vocab_size > config.vocab_size:
        raise InvalidInputError(
            f"{spec}: tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's vocab_size "
            f"({config.vocab_size})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AlbefModel(config)
    report = None
    if weights_path is None:
        logger.warning("%s: no weights given: RANDOM INIT (seed %d)", spec, seed)
        digest = sha256_state_dict(model.state_dict())
        weights = "random-init"
    else:
        report = load_albef_checkpoint(model, weights_path)
        digest = sha256_file(weights_path)
        weights = str(weights_path)
    precision = _effective_precision(dev, precision)
    model = model.to(device=dev, dtype=_model_dtype(dev, precision)).eval()
    model.requires_grad_(False)
    return AlbefBundle(model, tokenizer, config, dev, precision, weights, digest, report)


class _AlbefBase:
    #: bf16 autocast on a CPU with native bf16 is measured faster than fp32 for ALBEF (3.4x build, 2.2x rerank
    #: at C=128 on an AMX Xeon, docs/benchmarks.md); the registry reads this to allow ``bf16``/``auto`` there
    cpu_bf16 = True

    def __init__(self, bundle: AlbefBundle, info: ModelInfo) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.info = info
        self.device = bundle.device
        #: what runs (the registry may set bf16 on a CPU for ``auto``: the weights are fp32 there either way)
        self.precision: Precision = bundle.precision
        self._transform = SquashTransform(info.preprocess)

    def amp(self) -> contextlib.AbstractContextManager[object]:
        """The autocast every forward pass runs in (bf16 on a CPU with native bf16, else none)."""
        return cpu_autocast(self.device, self.precision)

    @property
    def image_transform(self) -> ImageTransform:
        return self._transform

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        res = self.bundle.config.image_res
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise InvalidInputError(f"expected a pixel batch [n, 3, {res}, {res}], got {tuple(pixels.shape)}")
        if tuple(pixels.shape[2:]) != (res, res):
            raise InvalidInputError(f"ALBEF expects {res}x{res} pixels, got {tuple(pixels.shape[2:])}")
        return pixels.to(self.device, dtype=self.bundle.dtype, non_blocking=True)

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise InvalidInputError("pass a list of strings, not one string")
        ids, mask = self.tokenizer(list(texts))
        return ids.to(self.device), mask.to(self.device)


class AlbefDualEncoder(_AlbefBase):
    """Stage 1: ALBEF's ITC embeddings (normalised ``vision_proj``/``text_proj`` of the CLS states)."""

    @property
    def embed_dim(self) -> int:
        return self.bundle.config.embed_dim

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        with self.amp():
            emb = self.model.image_embed(self.model.image_tokens(self._pixels(pixels)))
        return emb.float().cpu().numpy()

    @torch.inference_mode()
    def encode_images_with_tokens(self, pixels: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """One ViT pass → (ITC embeddings [n, E] float32, vision tokens [n, L, Dv] fp16 on the CPU): what an
        index build needs when the same ALBEF model also reranks (tokens feed the feature cache)."""
        with self.amp():
            tokens = self.model.image_tokens(self._pixels(pixels))
            emb = self.model.image_embed(tokens).float().cpu().numpy()
        return emb, tokens.to("cpu", torch.float16)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        ids, mask = self._tokens(texts)
        with self.amp():
            emb = self.model.text_embed(self.model.text_states(ids, mask))
        return emb.float().cpu().numpy()


class AlbefCrossEncoder(_AlbefBase):
    """Stage 2: ALBEF's ITM head. ``score`` returns the logit of class 1 ("match") and its softmax prob.

    ``kv_cache=True``: :meth:`image_states` / :meth:`image_states_from_tokens` also compute the fusion
    layers' cross-attention K/V of each image (``ImageStates.kv``, ~21 MB fp32 per base-size image), so every
    later ``score`` against those states skips ~70% of the fusion FLOPs. Worth it only when the same
    ImageStates are scored against several texts; for one text per set of states leave it off (the
    default): without a cache, ``score`` works from the tokens directly (see
    ``BertSelfAttention.cross_attention_folded``).
    ``max_pairs`` bounds one forward's batch (longer candidate lists run in chunks of that size)."""

    def __init__(
        self, bundle: AlbefBundle, info: ModelInfo, *, kv_cache: bool = False, max_pairs: int = 256
    ) -> None:
        super().__init__(bundle, info)
        self.kv_cache = kv_cache
        self.max_pairs = max_pairs

    @torch.inference_mode()
    def text_states(self, texts: Sequence[str]) -> TextStates:
        ids, mask = self._tokens(texts)
        with self.amp():
            hidden = self.model.text_states(ids, mask)
        return TextStates(ids, mask, hidden.to(self.bundle.dtype))

    @torch.inference_mode()
    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        with self.amp():
            tokens = self.model.image_tokens(self._pixels(pixels))
        return self.image_states_from_tokens(tokens)

    @torch.inference_mode()
    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        cfg = self.bundle.config
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (cfg.num_image_tokens, cfg.vision_width):
            raise InvalidInputError(
                f"expected image tokens [n, {cfg.num_image_tokens}, {cfg.vision_width}], got {tuple(tokens.shape)}"
            )
        tokens = tokens.to(self.device, dtype=self.bundle.dtype)
        kv = None
        if self.kv_cache:
            with self.amp():
                kv = tuple(
                    (k.to(self.bundle.dtype), v.to(self.bundle.dtype)) for k, v in self.model.cross_kv(tokens)
                )
        return ImageStates(tokens, kv)

    @torch.inference_mode()
    def score(self, text: TextStates, images: ImageStates) -> MatchScores:
        n = pair_count(text, images)  # InvalidInputError unless equal batches or one side 1
        nt, ni = len(text), len(images)
        if n == 0:
            return MatchScores(np.zeros(0, np.float32), np.zeros(0, np.float32))
        hidden = text.hidden
        ids, mask = text.ids.to(self.device), text.mask.to(self.device)
        if hidden is None:
            with self.amp():
                hidden = self.model.text_states(ids, mask)
        hidden = hidden.to(self.device, dtype=self.bundle.dtype)
        outs = []
        for start in range(0, n, self.max_pairs):
            sl = slice(start, min(n, start + self.max_pairs))
            h, m = (hidden, mask) if nt == 1 else (hidden[sl], mask[sl])
            if ni == 1:
                tok, kv = images.tokens, images.kv
            else:
                tok = images.tokens[sl]
                kv = None if images.kv is None else tuple((k[sl], v[sl]) for k, v in images.kv)
            tok = tok.to(self.device, dtype=self.bundle.dtype)
            if kv is not None:
                kv = tuple(
                    (k.to(self.device, self.bundle.dtype), v.to(self.device, self.bundle.dtype))
                    for k, v in kv
                )
            with self.amp():
                outs.append(self.model.itm_logits(h, m, None if kv is not None else tok, kv=kv).float())
        logits = torch.cat(outs)
        prob = logits.softmax(dim=-1)[:, 1]
        return MatchScores(logits[:, 1].cpu().numpy(), prob.cpu().numpy())

    def grounding(self, text: str, pixels: torch.Tensor, *, layer: int | None = None) -> Grounding:
        """Per-word Grad-CAM of the ITM "match" logit on fusion layer ``layer``'s cross-attention (see
        :mod:`alignfuse.models.albef.grounding`). ``pixels``: one transformed image [1, 3, R, R]."""
        from alignfuse.models.albef.grounding import check_layer, cross_attention_gradcam, patch_grid

        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("grounding needs a non-empty text", detail={"field": "text"})
        fusion_layer = check_layer(self.model, layer)
        ids, mask = self._tokens([text])
        with torch.inference_mode(False), torch.no_grad():
            tokens = self.model.image_tokens(self._pixels(pixels[:1]))
        logits, cam = cross_attention_gradcam(self.model, ids, mask, tokens, fusion_layer)
        pieces = self.tokenizer.tokenizer.convert_ids_to_tokens(ids[0, 1 : cam.shape[0]].tolist())
        words, owner = merge_word_pieces(pieces)
        token_maps = patch_grid(cam[1:], tokens.shape[1])  # [CLS] row dropped
        return Grounding(
            words=words,
            heatmaps=heatmaps_per_word(token_maps, owner, len(words)),
            tokens=tuple(pieces),
            word_of_token=owner,
            layer=fusion_layer,
            logit=float(logits[1]),
            prob=float(logits.softmax(-1)[1]),
        )


# ---------------------------------------------------------------------------- shared loading for the registry
_SHARED: weakref.WeakValueDictionary[tuple[str, str, str, str], AlbefBundle] = weakref.WeakValueDictionary()


def shared_bundle(
    config: AlbefConfig,
    weights_path: str | Path | None,
    device: torch.device,
    precision: Precision,
    spec: str,
) -> AlbefBundle:
    """Like :func:`build_albef`, but a dual and a cross adapter created for the same config/weights/device
    share one model while either is alive."""
    key = (config.to_json(), str(weights_path), str(device), precision)
    bundle = _SHARED.get(key)
    if bundle is None:
        bundle = build_albef(config, weights_path, device, precision, spec=spec)
        _SHARED[key] = bundle
    return bundle
