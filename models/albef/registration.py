"""Factories for ``albef:`` specs (see :mod:`alignfuse.models.albef`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from alignfuse.errors import ModelUnavailableError
from alignfuse.models.albef.adapters import AlbefCrossEncoder, AlbefDualEncoder, shared_bundle
from alignfuse.models.albef.checkpoint import (
    ALBEF_WEIGHTS,
    albef_cache_path,
    normalise_tag,
    resolve_albef_weights,
)
from alignfuse.models.albef.config import ALBEF_CONFIGS, AlbefConfig, get_albef_config
from alignfuse.models.base import Precision
from alignfuse.models.registry import ModelEntry, ModelSpec

logger = logging.getLogger(__name__)


def _weights_for(spec: ModelSpec) -> str | None:
    """None (random init), or a local file path for the spec's tag (downloading official tags)."""
    from alignfuse.models import hub

    tag = spec.tag
    if tag is None:
        return None
    looks_like_path = (
        os.sep in tag or tag.endswith((".pth", ".pt", ".bin", ".safetensors")) or tag.startswith("~")
    )
    if looks_like_path:
        path = Path(tag).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(f"{spec.raw}: weights file {path} does not exist")
        return str(path)
    normalise_tag(tag)  # InvalidInputError on unknown tags
    return str(resolve_albef_weights(tag, hub.DEFAULT_CACHE_DIR, spec=spec.raw))


def _config_for(spec: ModelSpec) -> tuple[AlbefConfig, str]:
    return get_albef_config(spec.name), spec.name


def _bundle(spec: ModelSpec, device: torch.device, precision: Precision):  # type: ignore[no-untyped-def]
    config, arch = _config_for(spec)
    weights = _weights_for(spec)
    return shared_bundle(config, weights, device, precision, spec.raw), arch


def albef_dual(spec: ModelSpec, device: torch.device, precision: Precision) -> AlbefDualEncoder:
    bundle, arch = _bundle(spec, device, precision)
    desc = f"ALBEF {arch} ITC dual encoder ({bundle.weights})"
    return AlbefDualEncoder(bundle, bundle.info(spec.raw, arch, desc, kind="dual"))


def albef_cross(spec: ModelSpec, device: torch.device, precision: Precision) -> AlbefCrossEncoder:
    bundle, arch = _bundle(spec, device, precision)
    desc = f"ALBEF {arch} ITM reranker ({bundle.weights})"
    # No K/V cache by default: the service rebuilds image states from cached tokens per query and scores them
    # against one text, where projecting K/V up front saves nothing (and costs ~10-21 MB per image).
    return AlbefCrossEncoder(bundle, bundle.info(spec.raw, arch, desc, kind="cross"))


def albef_known() -> list[ModelEntry]:
    from alignfuse.models import hub

    out = [ModelEntry("albef:tiny", "dual+cross", "tiny random-init ALBEF (tests)", None)]
    descriptions = {
        "coco": "ALBEF 14M fine-tuned on COCO retrieval (mscoco.pth)",
        "flickr30k": "ALBEF 14M fine-tuned on Flickr30K retrieval (flickr30k.pth)",
        "4m": "ALBEF pre-trained on 4M images (ALBEF_4M.pth, 256 px pos_embed interpolated)",
        "14m": "ALBEF pre-trained on 14M images (ALBEF.pth, 256 px pos_embed interpolated)",
    }
    for tag in ALBEF_WEIGHTS:
        cached = albef_cache_path(tag, hub.DEFAULT_CACHE_DIR).is_file()
        out.append(ModelEntry(f"albef:base@{tag}", "dual+cross", descriptions[tag], cached))
    _ = ALBEF_CONFIGS
    return out
