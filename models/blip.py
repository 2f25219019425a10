"""BLIP image-text retrieval through ``transformers`` (``BlipForImageTextRetrieval`` + ``BlipProcessor``).

Specs: ``blip:Salesforce/blip-itm-base-coco`` (also ``-large-coco``, ``-base-flickr``, ``-large-flickr``) or
``blip:/path/to/dir`` (a directory written by ``save_pretrained`` holding the model and its processor).

* :class:`BlipDualEncoder`: ITC, i.e. the ``use_itm_head=False`` path (normalised ``vision_proj`` of the
  vision CLS token, ``text_proj`` of the text encoder's CLS state without cross-attention).
* :class:`BlipCrossEncoder`: ITM, the ``use_itm_head=True`` path. BLIP has cross-attention in every text
  layer, so :class:`TextStates` carries only ids + mask (``hidden=None``) and the whole text tower runs per
  pair; image states are the vision model's output tokens.

Texts are stripped and tokenised by the processor's tokenizer (lower-casing WordPiece, ``[CLS] ... [SEP]``),
padded/truncated to ``max_text_len`` (35, BLIP's retrieval setting).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.albef.adapters import SquashTransform
from alignfuse.models.base import (
    Grounding,
    ImageStates,
    ImageTransform,
    MatchScores,
    ModelInfo,
    Precision,
    Preprocess,
    TextStates,
    heatmaps_per_word,
    merge_word_pieces,
    pair_count,
)
from alignfuse.models.registry import ModelEntry, ModelSpec, register_family

logger = logging.getLogger(__name__)

BLIP_MODELS = {
    "Salesforce/blip-itm-base-coco": "BLIP ViT-B ITM fine-tuned on COCO",
    "Salesforce/blip-itm-large-coco": "BLIP ViT-L ITM fine-tuned on COCO",
    "Salesforce/blip-itm-base-flickr": "BLIP ViT-B ITM fine-tuned on Flickr30K",
    "Salesforce/blip-itm-large-flickr": "BLIP ViT-L ITM fine-tuned on Flickr30K",
}
MAX_TEXT_LEN = 35
#: LAVIS explains BLIP's ITM at text layer 6 (``compute_gradcam(..., block_num=6)``)
BLIP_GRADCAM_LAYER = 6
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def _hub_cached(repo: str, filename: str = "config.json") -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    return hit if isinstance(hit, str) else None


def locate_pretrained(spec: ModelSpec, *, family: str, label: str, example: str) -> tuple[str, bool]:
    """(path or repo id to load from, local_files_only) for a transformers ``save_pretrained`` model named by
    ``spec`` (``<family>:<hub id or local dir>``; BLIP and ViLT). Fails fast when nothing can be loaded."""
    from alignfuse.models.hub import hub_offline, require_download

    if spec.tag is not None:
        raise InvalidInputError(
            f"{spec.raw}: {label} specs take no '@tag' (use {family}:<hub id or local dir>)"
        )
    name = spec.name
    hint = f"Download the model elsewhere (save_pretrained) and pass its directory: {family}:/path/to/{family}-dir"
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelUnavailableError(f"{spec.raw}: {label} directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"{spec.raw}: {path} has no config.json (not a save_pretrained dir)")
        if not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
            raise ModelUnavailableError(f"{spec.raw}: {path} has no tokenizer (vocab.txt / tokenizer.json)")
        return str(path), True
    if "/" not in name:
        raise InvalidInputError(f"{spec.raw}: expected a hub id like {example} or a directory")
    if _hub_cached(name) is not None and _hub_cached(name, "vocab.txt") is not None:
        return name, True
    if hub_offline():
        raise ModelUnavailableError(
            f"{spec.raw}: not in the Hugging Face cache and HF_HUB_OFFLINE is set. {hint}"
        )
    require_download(spec.raw, "https://huggingface.co", hint=hint)
    return name, False


def _locate(spec: ModelSpec) -> tuple[str, bool]:
    return locate_pretrained(spec, family="blip", label="BLIP", example="Salesforce/blip-itm-base-coco")


def _weights_sha256(source: str, model: torch.nn.Module) -> tuple[str, str]:
    from alignfuse.models.hub import sha256_file, sha256_state_dict

    for fname in _WEIGHT_FILES:
        path = Path(source) / fname if Path(source).is_dir() else None
        if path is None:
            cached = _hub_cached(source, fname)
            path = Path(cached) if cached else None
        if path is not None and path.is_file():
            return str(path), sha256_file(path)
    return source, sha256_state_dict(model.state_dict())


@dataclass
class BlipBundle:
    model: Any  # transformers.BlipForImageTextRetrieval
    tokenizer: Any
    preprocess: Preprocess
    device: torch.device
    dtype: torch.dtype
    weights: str
    weights_sha256: str
    embed_dim: int


_SHARED: weakref.WeakValueDictionary[tuple[str, str, str], BlipBundle] = weakref.WeakValueDictionary()


def load_blip(spec: ModelSpec, device: torch.device, precision: Precision) -> BlipBundle:
    """Load (or reuse, while alive) the BLIP retrieval model and processor named by ``spec``."""
    key = (spec.name, str(device), precision)
    hit = _SHARED.get(key)
    if hit is not None:
        return hit
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    source, local_only = _locate(spec)
    try:
        processor = BlipProcessor.from_pretrained(source, local_files_only=local_only)
        model: Any = BlipForImageTextRetrieval.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{spec.raw}: cannot load BLIP from {source}: {exc}") from exc
    tokenizer = processor.tokenizer
    if len(tokenizer) < 10:  # transformers falls back to a 5-token vocabulary when files are missing
        raise ModelUnavailableError(f"{spec.raw}: the tokenizer in {source} has no real vocabulary")
    ip = processor.image_processor
    size = getattr(ip.size, "height", None) or (ip.size.get("height") if hasattr(ip.size, "get") else ip.size)
    pre = Preprocess(
        image_size=int(size),
        mean=tuple(float(x) for x in ip.image_mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in ip.image_std),  # type: ignore[arg-type]
        interpolation="bicubic",
        resize_mode="squash",
        center_crop=False,
    )
    dtype = (
        torch.float32
        if device.type == "cpu"
        else {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    )
    if device.type == "cpu" and precision != "fp32":
        logger.warning("%s: %s on CPU is slow here; running fp32", spec.raw, precision)
    weights, digest = _weights_sha256(source, model)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    bundle = BlipBundle(
        model, tokenizer, pre, device, dtype, weights, digest, int(model.config.image_text_hidden_size)
    )
    _SHARED[key] = bundle
    return bundle


class _BlipBase:
    def __init__(self, bundle: BlipBundle, info: ModelInfo, max_text_len: int = MAX_TEXT_LEN) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.info = info
        self.device = bundle.device
        self.max_text_len = max_text_len
        self._transform = SquashTransform(bundle.preprocess)

    @property
    def image_transform(self) -> ImageTransform:
        return self._transform

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise InvalidInputError("pass a list of strings, not one string")
        cleaned = [t.strip() for t in texts]
        if any(not t for t in cleaned):
            raise InvalidInputError("empty text")
        enc = self.bundle.tokenizer(
            cleaned, padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _vision(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.bundle.preprocess.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise InvalidInputError(f"expected pixels [n, 3, {size}, {size}], got {tuple(pixels.shape)}")
        px = pixels.to(self.device, dtype=self.bundle.dtype)
        return self.model.vision_model(pixel_values=px).last_hidden_state


class BlipDualEncoder(_BlipBase):
    """BLIP ITC embeddings (``use_itm_head=False``)."""

    @property
    def embed_dim(self) -> int:
        return self.bundle.embed_dim

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        feats = F.normalize(self.model.vision_proj(self._vision(pixels)[:, 0, :]), dim=-1)
        return feats.float().cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        ids, mask = self._tokens(texts)
        states = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(self.model.text_proj(states[:, 0, :]), dim=-1).float().cpu().numpy()


class BlipCrossEncoder(_BlipBase):
    """BLIP ITM (``use_itm_head=True``): logit of class 1 and its softmax probability per pair."""

    def __init__(self, bundle: BlipBundle, info: ModelInfo, max_pairs: int = 128) -> None:
        super().__init__(bundle, info)
        self.max_pairs = max_pairs

    @torch.inference_mode()
    def text_states(self, texts: Sequence[str]) -> TextStates:
        ids, mask = self._tokens(texts)
        return TextStates(ids, mask, None)

    @torch.inference_mode()
    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        return ImageStates(self._vision(pixels))

    @torch.inference_mode()
    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        if tokens.ndim != 3:
            raise InvalidInputError(f"expected image tokens [n, L, D], got {tuple(tokens.shape)}")
        return ImageStates(tokens.to(self.device, dtype=self.bundle.dtype))

    @torch.inference_mode()
    def score(self, text: TextStates, images: ImageStates) -> MatchScores:
        n = pair_count(text, images)  # InvalidInputError unless equal batches or one side 1
        nt, ni = len(text), len(images)
        if n == 0:
            return MatchScores(np.zeros(0, np.float32), np.zeros(0, np.float32))
        ids, mask = text.ids.to(self.device), text.mask.to(self.device)
        tokens = images.tokens.to(self.device, dtype=self.bundle.dtype)
        outs = []
        for start in range(0, n, self.max_pairs):
            stop = min(n, start + self.max_pairs)
            m = stop - start
            i_ids = ids.expand(m, -1) if nt == 1 else ids[start:stop]
            i_mask = mask.expand(m, -1) if nt == 1 else mask[start:stop]
            tok = tokens.expand(m, -1, -1) if ni == 1 else tokens[start:stop]
            atts = torch.ones(tok.shape[:2], dtype=torch.long, device=self.device)
            hidden = self.model.text_encoder(
                input_ids=i_ids, attention_mask=i_mask, encoder_hidden_states=tok, encoder_attention_mask=atts
            ).last_hidden_state
            outs.append(self.model.itm_head(hidden[:, 0, :]).float())
        logits = torch.cat(outs)
        return MatchScores(logits[:, 1].cpu().numpy(), logits.softmax(-1)[:, 1].cpu().numpy())

    def grounding(self, text: str, pixels: torch.Tensor, *, layer: int | None = None) -> Grounding:
        """Grad-CAM of the ITM "match" logit on text layer ``layer``'s cross-attention (BLIP cross-attends
        in every text layer; default: LAVIS's ``block_num=6``, never the last layer), heads averaged,
        positive part, word pieces summed per word (see :class:`~alignfuse.models.base.Grounding`)."""
        layers = self.model.text_encoder.encoder.layer
        n = len(layers)
        if layer is None:
            layer = max(0, min(BLIP_GRADCAM_LAYER, n - 2))
        if not 0 <= layer < n:
            raise InvalidInputError(
                f"layer must be a text layer index 0..{n - 1}, got {layer}",
                detail={"field": "layer", "min": 0, "max": n - 1},
            )
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("grounding needs a non-empty text", detail={"field": "text"})
        ids, mask = self._tokens([text])
        length = int(mask.sum())
        ids, mask = ids[:, :length], mask[:, :length]
        captured: list[torch.Tensor] = []
        hook = layers[layer].crossattention.self.register_forward_hook(
            lambda _m, _i, out: captured.append(out[1])
        )
        try:
            with torch.inference_mode(False), torch.enable_grad():
                # image tokens that require grad put the cross-attention probabilities in the autograd graph
                tokens = self._vision(pixels[:1]).detach().requires_grad_(True)
                atts = torch.ones(tokens.shape[:2], dtype=torch.long, device=self.device)
                hidden = self.model.text_encoder(
                    input_ids=ids,
                    attention_mask=mask,
                    encoder_hidden_states=tokens,
                    encoder_attention_mask=atts,
                ).last_hidden_state
                logits = self.model.itm_head(hidden[:, 0, :])[0].float()
                (probs,) = captured
                (grad,) = torch.autograd.grad(logits[1], probs)
        finally:
            hook.remove()
        logits = logits.detach()
        cam = (probs.detach() * grad.clamp(min=0)).mean(dim=1)[0].float()  # [T, 1 + P]
        p = cam.shape[1] - 1
        side = round(p**0.5)
        if side * side != p:
            raise InvalidInputError(f"image tokens {cam.shape[1]} do not form a square patch grid")
        # the word pieces: [CLS] ... [SEP] → drop both
        pieces = self.bundle.tokenizer.convert_ids_to_tokens(ids[0, 1 : length - 1].tolist())
        words, owner = merge_word_pieces(pieces)
        maps = cam[1 : length - 1, 1:].reshape(-1, side, side).cpu().numpy().astype(np.float32)
        return Grounding(
            words=words,
            heatmaps=heatmaps_per_word(maps, owner, len(words)),
            tokens=tuple(pieces),
            word_of_token=owner,
            layer=layer,
            logit=float(logits[1]),
            prob=float(logits.softmax(-1)[1]),
        )


def _info(spec: ModelSpec, bundle: BlipBundle, kind: str) -> ModelInfo:
    return ModelInfo(
        spec=spec.raw,
        family="blip",
        arch=spec.name,
        weights=bundle.weights,
        weights_sha256=bundle.weights_sha256,
        embed_dim=bundle.embed_dim,
        preprocess=bundle.preprocess,
        description=BLIP_MODELS.get(spec.name, f"BLIP retrieval model from {spec.name}") + f" ({kind})",
        extra=(("kind", kind),),
        default_fusion="itm+itc",
    )


def blip_dual(spec: ModelSpec, device: torch.device, precision: Precision) -> BlipDualEncoder:
    bundle = load_blip(spec, device, precision)
    return BlipDualEncoder(bundle, _info(spec, bundle, "dual"))


def blip_cross(spec: ModelSpec, device: torch.device, precision: Precision) -> BlipCrossEncoder:
    bundle = load_blip(spec, device, precision)
    return BlipCrossEncoder(bundle, _info(spec, bundle, "cross"))


def blip_known() -> list[ModelEntry]:
    return [
        ModelEntry(f"blip:{repo}", "dual+cross", desc, _hub_cached(repo) is not None)
        for repo, desc in BLIP_MODELS.items()
    ]


register_family("blip", dual=blip_dual, cross=blip_cross, known=blip_known)
