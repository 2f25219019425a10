"""open_clip as a DualEncoder: any architecture with a pretrained tag, an ``hf-hub:`` id, or a local file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import pretrained as oc_pretrained

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import ImageTransform, ModelInfo, Precision, Preprocess, cpu_autocast
from alignfuse.models.hub import require_download, sha256_file, sha256_state_dict
from alignfuse.models.registry import ModelEntry, ModelSpec, register_family

log = logging.getLogger(__name__)

_HF_ENDPOINT = "https://huggingface.co"


class OpenClipDualEncoder:
    """Wraps an ``open_clip`` CLIP model. Embeddings are float32 and L2-normalised."""

    def __init__(
        self,
        model: Any,
        transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        info: ModelInfo,
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.model = model.eval()
        self._transform = transform
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.precision = precision

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def image_transform(self) -> ImageTransform:
        return self._transform

    #: bf16 autocast on the CPU is measured slower than fp32 for open_clip's towers (ViT-B-32 on an AMX Xeon:
    #: 7x fewer images/s, 1.4x slower text; docs/benchmarks.md), so the registry runs them fp32 on a CPU
    cpu_bf16 = False

    def _autocast(self) -> Any:
        if self.device.type == "cuda" and self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return cpu_autocast(self.device, self.precision)  # bf16 on a CPU with native bf16, else nothing

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        if pixels.ndim != 4:
            raise InvalidInputError(f"expected a pixel batch [n, 3, H, W], got shape {tuple(pixels.shape)}")
        dtype = next(self.model.parameters()).dtype
        with self._autocast():
            feats = self.model.encode_image(pixels.to(self.device, dtype=dtype, non_blocking=True))
        return F.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            feats = _encode_text_trimmed(self.model, tokens)
            if feats is None:
                feats = self.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def _encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    """``model.encode_text`` on the batch cut after its longest text (same features, a fraction of the work).

    A standard CLIP text tower is causal (no position attends to a later one) and reads its features at the
    end-of-text token (``argmax`` pooling), so the padding after the longest text of the batch changes
    nothing: a short query costs ~10 positions instead of the context length (77). Returns None for other
    towers (no causal mask, other pooling, custom text towers), which run untrimmed.
    """
    if (
        type(model) is not open_clip.CLIP
        or getattr(model, "text_pool_type", None) != "argmax"
        or getattr(model, "attn_mask", None) is None
    ):
        return None
    length = int(tokens.argmax(dim=-1).max()) + 1
    if length >= tokens.shape[1]:
        return None
    t = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def preprocess_of(model: torch.nn.Module) -> Preprocess:
    """The Preprocess record read from the model itself (never from constants)."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, list | tuple):
        size = int(size[0])
    mean = tuple(float(x) for x in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(x) for x in cfg.get("std", open_clip.OPENAI_DATASET_STD))
    resize_mode = cfg.get("resize_mode", "shortest")
    return Preprocess(
        image_size=int(size),
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode="squash"
        if resize_mode == "squash"
        else ("longest" if resize_mode == "longest" else "shortest"),
        center_crop=resize_mode != "squash",
    )


def _resolve_pretrained(spec: ModelSpec, cache_dir: str | None) -> str | None:
    """Turn the spec's tag into a local weights file, downloading when possible, failing fast when not."""
    tag = spec.tag
    if tag is None:
        return None
    if os.sep in tag or tag.endswith((".bin", ".pt", ".pth", ".safetensors")):
        path = Path(tag).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(f"{spec.raw}: weights file {path} does not exist")
        return str(path)
    cfg = oc_pretrained.get_pretrained_cfg(spec.name, tag)
    if not cfg:
        tags = oc_pretrained.list_pretrained_tags_by_model(spec.name)
        raise InvalidInputError(
            f"{spec.raw}: unknown pretrained tag {tag!r} for {spec.name}; known tags: {', '.join(tags) or 'none'}"
        )
    hint = f"Download the weights elsewhere and pass the file: open_clip:{spec.name}@/path/to/open_clip_model.safetensors"
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        candidates = (
            [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        for fn in candidates:
            try:
                return str(hf_hub_download(repo_id, fn, cache_dir=cache_dir, local_files_only=True))
            except (LocalEntryNotFoundError, FileNotFoundError, OSError):
                continue
        require_download(spec.raw, _HF_ENDPOINT, hint=hint)
        last: Exception | None = None
        for fn in candidates:
            try:
                return str(hf_hub_download(repo_id, fn, cache_dir=cache_dir))
            except Exception as exc:
                last = exc
        raise ModelUnavailableError(f"{spec.raw}: download from the hub failed: {last}. {hint}")
    url = cfg.get("url", "")
    if url:
        target_dir = Path(cache_dir or Path.home() / ".cache" / "clip")
        local = target_dir / os.path.basename(url)
        if local.is_file():
            return str(local)
        require_download(spec.raw, url, hint=hint)
        return str(oc_pretrained.download_pretrained_from_url(url, cache_dir=str(target_dir)))
    raise ModelUnavailableError(f"{spec.raw}: tag {tag!r} has no download location. {hint}")


def build_open_clip(
    spec: ModelSpec,
    device: torch.device,
    precision: Precision,
    *,
    arch: str | None = None,
    weights: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    description: str = "",
) -> OpenClipDualEncoder:
    """Create an open_clip dual encoder. ``arch``/``weights`` override what the spec says (builtin models)."""
    name = arch or spec.name
    hf = name.startswith(("hf-hub:", "local-dir:"))
    if not hf and name not in open_clip.list_models():
        raise InvalidInputError(
            f"{spec.raw}: unknown open_clip architecture {name!r} (see `alignfuse models`)"
        )
    weights_path = weights if weights is not None else (None if hf else _resolve_pretrained(spec, cache_dir))
    if hf and name.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        repo = name.removeprefix("hf-hub:")
        cached = try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache_dir)
        if not isinstance(cached, str):
            require_download(
                spec.raw, _HF_ENDPOINT, hint="Download the repo and use open_clip:local-dir:/path/to/dir"
            )
    oc_precision = (
        "fp32" if device.type == "cpu" else {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=weights_path,
                precision=oc_precision,
                device=device,
                cache_dir=cache_dir,
                weights_only=True,
            )
        except RuntimeError as exc:
            raise ModelUnavailableError(f"{spec.raw}: open_clip could not load the model: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(name)
    if weights_path is None and not hf:
        log.warning("%s: no pretrained weights given: RANDOM INIT (seed %d)", spec.raw, seed)
        checksum = sha256_state_dict(model.state_dict())
        weights_desc = "random-init"
    elif weights_path is not None:
        checksum = sha256_file(weights_path)
        weights_desc = weights_path
    else:
        checksum = sha256_state_dict(model.state_dict())
        weights_desc = name
    embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else 0
    if not embed_dim:
        with torch.inference_mode():
            embed_dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    scale = getattr(model, "logit_scale", None)
    itc_logit_scale = float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else None
    info = ModelInfo(
        spec=spec.raw,
        family="open_clip",
        arch=name,
        weights=weights_desc,
        weights_sha256=checksum,
        embed_dim=embed_dim,
        preprocess=preprocess_of(model),
        description=description or f"open_clip {name}",
        itc_logit_scale=itc_logit_scale,
    )
    return OpenClipDualEncoder(model, preprocess, tokenizer, info, device, precision)


def _dual(spec: ModelSpec, device: torch.device, precision: Precision) -> OpenClipDualEncoder:
    return build_open_clip(spec, device, precision)


def _known() -> list[ModelEntry]:
    out = [
        ModelEntry("open_clip:ViT-B-32", "dual", "open_clip ViT-B-32, random init (speed tests)", None),
    ]
    for arch, tag in (
        ("ViT-B-32", "laion2b_s34b_b79k"),
        ("ViT-B-16", "laion2b_s34b_b88k"),
        ("ViT-L-14", "openai"),
    ):
        cfg = oc_pretrained.get_pretrained_cfg(arch, tag)
        cached: bool | None = None
        hub = cfg.get("hf_hub", "") if cfg else ""
        if hub:
            from huggingface_hub import try_to_load_from_cache

            repo = hub.rstrip("/") if hub.endswith("/") else os.path.dirname(hub)
            cached = any(
                isinstance(try_to_load_from_cache(repo, fn), str)
                for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
            )
        out.append(ModelEntry(f"open_clip:{arch}@{tag}", "dual", f"CLIP {arch} ({tag})", cached))
    return out


register_family("open_clip", dual=_dual, known=_known)
