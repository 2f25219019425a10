"""The optional rerank cache: a cross-encoder's image tokens (fp16, memory-mapped) keyed by item id.

Written through :meth:`alignfuse.index.collection.CollectionWriter.put_features` (chunks ``features/<id>.npy`` fp16
[n, L, D] and ``features/<id>.ids.npy`` int64 [n], listed in the manifest); read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignfuse.errors import CorruptDataError, NotFoundError

from .manifest import EncoderRecord, FeaturesRecord


class FeatureCache:
    """Read-only view of the feature chunks of one committed version (thread-safe)."""

    def __init__(self, root: Path, record: FeaturesRecord, tombstones: np.ndarray | None = None) -> None:
        self._record = record
        arrays: list[np.ndarray] = []
        id_parts: list[np.ndarray] = []
        chunk_of: list[np.ndarray] = []
        for i, chunk in enumerate(record.chunks):
            try:
                arr = np.load(root / f"{chunk.id}.npy", mmap_mode="r")
                ids = np.load(root / f"{chunk.id}.ids.npy")
            except (OSError, ValueError) as exc:
                raise CorruptDataError(f"cannot read feature chunk {root / chunk.id}: {exc}") from exc
            if arr.shape[0] != ids.shape[0] or tuple(arr.shape[1:]) != tuple(record.token_shape):
                raise CorruptDataError(
                    f"feature chunk {root / chunk.id} has shape {arr.shape}, ids {ids.shape}"
                )
            arrays.append(arr)
            id_parts.append(ids.astype(np.int64, copy=False))
            chunk_of.append(np.full(ids.shape[0], i, dtype=np.int32))
        self._arrays = arrays
        all_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
        chunks = np.concatenate(chunk_of) if chunk_of else np.zeros(0, np.int32)
        rows = (
            np.concatenate([np.arange(len(p), dtype=np.int64) for p in id_parts])
            if id_parts
            else np.zeros(0, np.int64)
        )
        if tombstones is not None and len(tombstones):
            keep = ~np.isin(all_ids, tombstones)
            all_ids, chunks, rows = all_ids[keep], chunks[keep], rows[keep]
        # later chunks win for a repeated id (a re-put); stable sort keeps order, take the last occurrence
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        last = np.ones(len(sorted_ids), dtype=bool)
        if len(sorted_ids) > 1:
            last[:-1] = sorted_ids[:-1] != sorted_ids[1:]
        self._ids = sorted_ids[last]
        self._chunk = chunks[order][last]
        self._row = rows[order][last]

    @property
    def reranker(self) -> EncoderRecord:
        """The cross-encoder whose image tokens these are."""
        return self._record.reranker

    @property
    def token_shape(self) -> tuple[int, int]:
        """(L, D) of every entry."""
        return self._record.token_shape

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, int | np.integer):
            return False
        return bool(self.has([int(item_id)])[0])

    def ids(self) -> np.ndarray:
        """Sorted int64 ids with cached tokens."""
        return self._ids.copy()

    def has(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """bool [len(ids)]: whether each id has cached tokens."""
        q = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._ids, q)
        pos_c = np.minimum(pos, max(len(self._ids) - 1, 0))
        return (pos < len(self._ids)) & (self._ids[pos_c] == q) if len(self._ids) else np.zeros(len(q), bool)

    def get(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """fp16 tokens [len(ids), L, D] in the order of ``ids``; NotFoundError naming missing ids."""
        q = np.asarray(ids, dtype=np.int64).reshape(-1)
        present = self.has(q)
        if not present.all():
            missing = q[~present][:10].tolist()
            raise NotFoundError(f"no cached features for item ids {missing}")
        out = np.empty((len(q), *self.token_shape), dtype=np.float16)
        pos = np.searchsorted(self._ids, q)
        chunk = self._chunk[pos]
        row = self._row[pos]
        for c in np.unique(chunk):
            sel = np.nonzero(chunk == c)[0]
            rows = row[sel]
            order = np.argsort(rows)
            out[sel[order]] = self._arrays[int(c)][rows[order]]
        return out
