"""Value types shared by the ``index`` package (items, hits, search results)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Kind = Literal["image", "text"]
"""What an item is. Also names a modality: image vectors and text vectors live in separate indexes."""

Modality = Kind
KINDS: tuple[Kind, ...] = ("image", "text")
ItemState = Literal["live", "deleted"]


@dataclass(frozen=True)
class Item:
    """One row of ``items.sqlite`` as seen by a reader at its committed version.

    ``text`` is the caption of an image item (its first caption) or the text of a text item.
    ``metadata`` is the user metadata (JSON object). For captioned sources an image item has
    ``metadata["captions"]`` (all its captions) and a text item has ``metadata["image_uri"]`` (and
    ``metadata["image_item_id"]`` when the image is in the collection) linking it to its image.
    """

    id: int
    kind: Kind
    uri: str
    sha256: str
    text: str | None
    metadata: Mapping[str, Any]
    state: ItemState
    version_added: int
    version_deleted: int | None = None


@dataclass(frozen=True)
class NewItem:
    """An item to add through a :class:`~alignfuse.index.collection.CollectionWriter` (no id yet)."""

    kind: Kind
    uri: str
    sha256: str
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """Top-k of a batch of query vectors over one modality.

    ``ids`` int64 [q, k] (item ids, ``-1`` where fewer than k live items exist), ``scores`` float32 [q, k]
    (inner product of L2-normalised vectors = cosine; ``-inf`` where ``ids == -1``), sorted by score
    descending, ties by id ascending. ``version`` is the committed collection version that answered.
    """

    ids: np.ndarray
    scores: np.ndarray
    version: int
    modality: Modality

    def row(self, i: int) -> list[tuple[int, float]]:
        """(id, score) pairs of query ``i``, without the ``-1`` padding."""
        return [(int(a), float(s)) for a, s in zip(self.ids[i], self.scores[i], strict=True) if int(a) >= 0]


@dataclass(frozen=True)
class Hit:
    """One search hit joined with its item row."""

    rank: int
    id: int
    score: float
    item: Item
