"""ALBEF (Li et al., 2021) implemented in PyTorch: ViT-B/16 (timm) + BERT text/fusion encoder of our own,
with ALBEF's parameter names so the official checkpoints load. Registers the ``albef`` model family.

Specs: ``albef:base@coco`` / ``@flickr30k`` / ``@4m`` / ``@14m`` (official weights, downloaded into the cache
directory ``alignfuse.models.hub.DEFAULT_CACHE_DIR``), ``albef:base@/path/file.pth`` (local file, any of the three
checkpoint formats, or ``.safetensors``), ``albef:/path/config.json@/path/file.pth`` (custom sizes),
``albef:tiny`` (random init, for tests; also ``base``/``base-256`` without a tag).
"""

from __future__ import annotations

from alignfuse.models.albef.config import ALBEF_CONFIGS, AlbefConfig, get_albef_config
from alignfuse.models.albef.model import AlbefModel

__all__ = ["ALBEF_CONFIGS", "AlbefConfig", "AlbefModel", "get_albef_config", "register"]


def register() -> None:
    """Register the ``albef`` family with :mod:`alignfuse.models.registry` (done on import of this package)."""
    from alignfuse.models.albef.registration import albef_cross, albef_dual, albef_known
    from alignfuse.models.registry import register_family

    register_family("albef", dual=albef_dual, cross=albef_cross, known=albef_known)


register()
