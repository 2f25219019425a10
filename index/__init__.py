"""Collections on disk (FAISS + item store + feature cache), data sources and the streaming builder.

May import ``models`` (protocols, factories); never ``service`` or fastapi; never reads the environment.
The public names below are imported lazily (PEP 562), so ``import alignfuse.index.options`` does not load torch/faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "BuildOptions": "builder",
    "BuildReport": "builder",
    "build_collection": "builder",
    "Collection": "collection",
    "CollectionWriter": "collection",
    "create_collection": "collection",
    "is_collection": "collection",
    "open_collection": "collection",
    "FeatureCache": "features",
    "EncoderRecord": "manifest",
    "FeaturesRecord": "manifest",
    "Manifest": "manifest",
    "SegmentRecord": "manifest",
    "IndexOptions": "options",
    "choose_index_key": "options",
    "CaptionFileSource": "sources",
    "ImageFolderSource": "sources",
    "KarpathySource": "sources",
    "Source": "sources",
    "SourceItem": "sources",
    "TextSource": "sources",
    "open_source": "sources",
    "KINDS": "types",
    "Hit": "types",
    "Item": "types",
    "Kind": "types",
    "Modality": "types",
    "NewItem": "types",
    "SearchResult": "types",
}

__all__ = [
    "BuildOptions",
    "BuildReport",
    "CaptionFileSource",
    "Collection",
    "CollectionWriter",
    "EncoderRecord",
    "FeatureCache",
    "FeaturesRecord",
    "Hit",
    "ImageFolderSource",
    "IndexOptions",
    "Item",
    "KINDS",
    "KarpathySource",
    "Kind",
    "Manifest",
    "Modality",
    "NewItem",
    "SearchResult",
    "SegmentRecord",
    "Source",
    "SourceItem",
    "TextSource",
    "build_collection",
    "choose_index_key",
    "create_collection",
    "is_collection",
    "open_collection",
    "open_source",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .builder import BuildOptions, BuildReport, build_collection
    from .collection import (
        Collection,
        CollectionWriter,
        create_collection,
        is_collection,
        open_collection,
    )
    from .features import FeatureCache
    from .manifest import EncoderRecord, FeaturesRecord, Manifest, SegmentRecord
    from .options import IndexOptions, choose_index_key
    from .sources import (
        CaptionFileSource,
        ImageFolderSource,
        KarpathySource,
        Source,
        SourceItem,
        TextSource,
        open_source,
    )
    from .types import KINDS, Hit, Item, Kind, Modality, NewItem, SearchResult
