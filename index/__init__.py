"""Collections on disk (FAISS + item store + feature cache), data sources and the streaming builder.

May import ``models`` (protocols, factories); never ``service`` or fastapi; never reads the environment.
"""

from __future__ import annotations

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

__all__ = [
    "KINDS",
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
