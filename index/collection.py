"""A collection on disk: manifest + items.sqlite + immutable segments + optional feature cache.

(Over ~450 lines on purpose: the reader of the on-disk format and the commit protocol it relies on are written
down in one place, next to the layout they read; the writer lives in writer.py, the stores in store/segments.)

Layout (see docs/architecture.md)::

    <collection>/
      manifest.json          the current committed version (switched atomically with os.replace)
      versions/<n>.json      every committed manifest, kept
      items.sqlite           one row per item (WAL mode)
      segments/<seg>/        immutable: {image,text}.npy (float32 embeddings, the source of truth),
                             {image,text}.ids.npy (int64 item ids, row-aligned), {image,text}.faiss
      tombstones/<n>.npy     sorted int64 ids deleted but still inside live segments (version n)
      features/<chunk>.npy   optional rerank cache: fp16 image tokens [n, L, D] + <chunk>.ids.npy
      writer.lock            fcntl.flock'ed by the one writer; holds its pid

Versions and visibility. Every sqlite row carries ``version_added`` (and ``version_deleted`` once deleted);
a reader at version v sees a row iff ``version_added <= v`` and treats it as live iff it is not deleted at
or before v. A writer stages rows with ``version_added = base + 1`` (committed to sqlite, but invisible),
appends vectors to a new ``segments/seg-<base+1>/``, then commits: build the segment's FAISS indexes, fsync
files and folders, write the tombstone/feature files, ``os.replace`` ``manifest.json`` (the commit point),
then record ``versions/<n>.json``. A SIGKILL at any moment leaves the last committed version readable; the
next writer (under the lock) deletes rows newer than the manifest, un-deletes uncommitted deletes, removes
unreferenced files, and ids restart from the manifest's ``next_id`` (a resumed build gets the same ids).

Segments are never modified. Deletes are tombstones filtered at search time (each segment over-fetches by
its tombstone count). :meth:`CollectionWriter.merge` merges some segments (the builder merges the segments of
its periodic commits); :meth:`CollectionWriter.compact` merges all, drops tombstones and rewrites the
feature cache, and can re-derive the FAISS indexes with another key from the stored embeddings. Files only
older versions reference are garbage-collected at the next commit (the current and previous versions are
kept); a reader that loses a race with that retries with the newest manifest, and open snapshots keep
working on their already-opened files. Readers (:class:`Collection`) switch versions with
:meth:`Collection.refresh`; searches running on the old snapshot finish on it.

Where the parts live: :mod:`.store` (items.sqlite), :mod:`.segments` (file layout, loaded and staged
segments), :mod:`.writer` (:class:`CollectionWriter`); this module is the reader. It runs past ~450 lines
because this docstring is the protocol's one description and :class:`Collection` is one read-only API.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from alignfuse.errors import (
    ConflictError,
    CorruptDataError,
    EncoderMismatchError,
    InvalidInputError,
    NotFoundError,
)
from alignfuse.models.base import ModelInfo

from ._fs import WriterLock, fsync_dir, fsync_file
from .ann import get_executor, validate_index_key
from .features import FeatureCache
from .manifest import EncoderRecord, Manifest
from .options import IndexOptions
from .segments import (
    LOCK_FILE,
    MANIFEST,
    OWN_NAMES,
    SUBDIRS,
    LoadedSegment,
    Snapshot,
    versions_file,
    write_manifest,
)
from .store import (
    COLUMNS,
    ITEMS_DB,
    LIVE,
    SCHEMA,
    VISIBLE,
    ShaLookup,
    chunks,
    connect_ro,
    connect_rw,
    row_to_item,
)
from .types import KINDS, Hit, Item, Kind, Modality, SearchResult
from .writer import CollectionWriter

log = logging.getLogger(__name__)

__all__ = [
    "Collection",
    "CollectionWriter",
    "ShaLookup",
    "create_collection",
    "is_collection",
    "open_collection",
]


class Collection:
    """A read-only view of a collection at one committed version (thread-safe for search/get/list).

    Open with :meth:`open` (existing) or :meth:`create` (new, empty, version 0). ``encoder`` (a
    ``ModelInfo``) is checked against the manifest: a different spec or weights checksum raises
    ``EncoderMismatchError`` naming both.
    """

    def __init__(self, root: Path, options: IndexOptions, version: int | None = None) -> None:
        self._root = root
        self._options = options
        self._executor = get_executor(options)
        self._segments: dict[str, LoadedSegment] = {}
        self._refresh_lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._pinned = version is not None
        self._snap = self._load(version)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        encoder: ModelInfo,
        *,
        options: IndexOptions | None = None,
        reranker: ModelInfo | None = None,
    ) -> Collection:
        """Create an empty collection (version 0) at ``path`` (ConflictError if one exists there)."""
        root = Path(path)
        options = options or IndexOptions()
        index_key = (
            validate_index_key(options.index_key, int(encoder.embed_dim)) if options.index_key else None
        )
        if root.exists() and not root.is_dir():
            raise ConflictError(f"cannot create a collection at {root}: it is a file")
        root.mkdir(parents=True, exist_ok=True)
        if (root / MANIFEST).exists():
            raise ConflictError(f"a collection already exists at {root}")
        strangers = sorted(p.name for p in root.iterdir() if p.name not in OWN_NAMES)
        if strangers:
            raise ConflictError(
                f"cannot create a collection at {root}: the folder is not empty ({', '.join(strangers[:5])})"
            )
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
        lock = WriterLock(root / LOCK_FILE).acquire()
        try:
            if (root / MANIFEST).exists():
                raise ConflictError(f"a collection already exists at {root}")
            db = connect_rw(root)
            try:
                db.executescript(SCHEMA)
                db.execute("DELETE FROM items")  # leftovers of a creation killed before its manifest
            finally:
                db.close()
            now = time.time()
            manifest = Manifest(
                version=0,
                encoder=EncoderRecord.from_info(encoder),
                index_key=index_key,
                counts=(("image", 0), ("text", 0), ("deleted", 0)),
                next_id=1,
                reranker=None if reranker is None else EncoderRecord.from_info(reranker),
                created_at=now,
                committed_at=now,
            )
            for sub in SUBDIRS:
                fsync_dir(root / sub)
            fsync_file(root / ITEMS_DB)
            write_manifest(root, manifest)
            if root.parent.exists():
                fsync_dir(root.parent if str(root.parent) else Path("."))
        finally:
            lock.release()
        log.info("created collection %s (encoder %s)", root, manifest.encoder.id)
        return cls(root, options)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        encoder: ModelInfo | None = None,
        options: IndexOptions | None = None,
        version: int | None = None,
    ) -> Collection:
        """Open the last committed version (or ``version``). NotFoundError if ``path`` is no collection."""
        root = Path(path)
        if not (root / MANIFEST).is_file():
            if not root.exists():
                raise NotFoundError(f"collection not found: {root}")
            raise NotFoundError(f"not a collection (no {MANIFEST}): {root}")
        c = cls(root, options or IndexOptions(), version)
        if encoder is not None:
            try:
                c.check_encoder(encoder)
            except EncoderMismatchError:
                c.close()
                raise
        return c

    # -- loading ---------------------------------------------------------------------------------------
    def _read_manifest(self, version: int | None) -> Manifest:
        if version is None:
            return Manifest.load(self._root / MANIFEST)
        try:
            return Manifest.load(versions_file(self._root, version))
        except FileNotFoundError:
            raise NotFoundError(f"collection {self._root} has no committed version {version}") from None

    def _build_snapshot(self, m: Manifest) -> Snapshot:
        if m.encoder.embed_dim <= 0:
            raise CorruptDataError(f"manifest of {self._root} has no embedding dimension")
        segs = []
        for rec in m.segments:
            seg = self._segments.get(rec.id)
            if seg is None or seg.record != rec:
                seg = LoadedSegment(self._root, rec, self._options, self._executor)
            segs.append(seg)
        tomb = np.zeros(0, np.int64)
        if m.tombstones:
            tomb = np.load(self._root / m.tombstones).astype(np.int64, copy=False)
        features = None
        if m.features is not None and m.features.chunks:
            features = FeatureCache(self._root / "features", m.features, tomb)
        self._segments = {s.record.id: s for s in segs}
        return Snapshot(m, tuple(segs), tomb, features)

    def _load(self, version: int | None) -> Snapshot:
        last: Exception | None = None
        for attempt in range(8):
            m = self._read_manifest(version)
            try:
                return self._build_snapshot(m)
            except FileNotFoundError as exc:  # a writer garbage-collected files of an older version
                if version is not None:
                    raise NotFoundError(
                        f"version {version} of {self._root} is no longer stored (compacted away): {exc}"
                    ) from exc
                last = exc
                time.sleep(0.01 * (attempt + 1))
        raise CorruptDataError(f"cannot load collection {self._root}: {last}")

    # -- properties ------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._root

    @property
    def manifest(self) -> Manifest:
        """The committed manifest this reader is at."""
        return self._snap.manifest

    @property
    def version(self) -> int:
        return self._snap.manifest.version

    @property
    def dim(self) -> int:
        return self._snap.manifest.encoder.embed_dim

    @property
    def options(self) -> IndexOptions:
        return self._options

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU."""
        return self._executor.on_gpu

    def refresh(self) -> bool:
        """Load the newest committed version if it is newer; True when it changed. Searches running on the
        old version finish on it (snapshots are immutable)."""
        if self._pinned:
            return False
        with self._refresh_lock:
            try:
                current = Manifest.load(self._root / MANIFEST)
            except FileNotFoundError:
                raise NotFoundError(f"collection {self._root} disappeared") from None
            if current.version == self._snap.manifest.version:
                return False
            if current.version < self._snap.manifest.version:
                log.warning("collection %s went back to version %d", self._root, current.version)
            self._snap = self._load(None)
            log.info("collection %s now at version %d", self._root, self._snap.manifest.version)
            return True

    def check_encoder(self, encoder: ModelInfo) -> None:
        """Raise EncoderMismatchError unless ``encoder`` has the spec and weights checksum of the manifest."""
        self.manifest.encoder.check(encoder, what="dual encoder", collection=str(self._root))

    def check_reranker(self, reranker: ModelInfo) -> None:
        """Raise EncoderMismatchError unless ``reranker`` matches the manifest's reranker (if recorded)."""
        rec = self.manifest.reranker
        if rec is not None:
            rec.check(reranker, what="reranker", collection=str(self._root))

    # -- sqlite ----------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect_ro(self._root)
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def count(self, kind: Kind | None = None, *, include_deleted: bool = False) -> int:
        """Items (of ``kind``) at this version: live ones, plus deleted ones when ``include_deleted``."""
        where = VISIBLE if include_deleted else LIVE
        args: dict[str, Any] = {"v": self.version}
        if kind is not None:
            where += " AND kind = :kind"
            args["kind"] = kind
        return int(self._db().execute(f"SELECT COUNT(*) FROM items WHERE {where}", args).fetchone()[0])

    def get(self, item_id: int) -> Item:
        """One item visible at this version (deleted ones too, with ``state="deleted"``); NotFoundError."""
        v = self.version
        row = (
            self._db()
            .execute(
                f"SELECT {COLUMNS} FROM items WHERE id = :id AND {VISIBLE}", {"id": int(item_id), "v": v}
            )
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"no item {int(item_id)} in collection {self._root}")
        return row_to_item(row, v)

    def get_many(self, ids: Sequence[int] | np.ndarray) -> builtins.list[Item]:
        """Items in the order of ``ids`` (NotFoundError if any is unknown at this version)."""
        v = self.version
        wanted = [int(i) for i in ids]
        found: dict[int, Item] = {}
        db = self._db()
        for part in chunks(sorted(set(wanted))):
            q = ",".join("?" * len(part))
            for row in db.execute(
                f"SELECT {COLUMNS} FROM items WHERE id IN ({q}) AND version_added <= ?", (*part, v)
            ):
                found[int(row[0])] = row_to_item(row, v)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise NotFoundError(f"no items {missing[:10]} in collection {self._root}")
        return [found[i] for i in wanted]

    def list(
        self,
        *,
        kind: Kind | None = None,
        offset: int = 0,
        limit: int = 100,
        include_deleted: bool = False,
    ) -> builtins.list[Item]:
        """Items by id ascending."""
        if offset < 0 or limit < 0:
            raise InvalidInputError("offset and limit must be >= 0")
        v = self.version
        where = VISIBLE if include_deleted else LIVE
        args: dict[str, Any] = {"v": v, "limit": limit, "offset": offset}
        if kind is not None:
            where += " AND kind = :kind"
            args["kind"] = kind
        rows = self._db().execute(
            f"SELECT {COLUMNS} FROM items WHERE {where} ORDER BY id LIMIT :limit OFFSET :offset", args
        )
        return [row_to_item(r, v) for r in rows]

    def find_by_sha256(self, sha256: str, kind: Kind | None = None) -> Item | None:
        """The live item with this content hash, if any (lowest id)."""
        v = self.version
        args: dict[str, Any] = {"v": v, "sha": sha256}
        where = f"sha256 = :sha AND {LIVE}"
        if kind is not None:
            where += " AND kind = :kind"
            args["kind"] = kind
        row = (
            self._db()
            .execute(f"SELECT {COLUMNS} FROM items WHERE {where} ORDER BY id LIMIT 1", args)
            .fetchone()
        )
        return None if row is None else row_to_item(row, v)

    # -- vectors & search ------------------------------------------------------------------------------
    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(
                f"query vectors must have shape [n, {self.dim}] for collection {self._root}, got {q.shape}"
            )
        if not np.isfinite(q).all():
            raise InvalidInputError("query vectors contain NaN or infinity")
        return np.ascontiguousarray(q)

    def search(self, queries: np.ndarray, k: int, modality: Modality) -> SearchResult:
        """Top-``k`` live items of ``modality`` for each row of ``queries`` (float32 [q, dim] or [dim]).

        Fans out over the segments' FAISS indexes (over-fetching by each segment's tombstone count, so
        k live results come back when they exist), merges by score (ties by id)."""
        if modality not in KINDS:
            raise InvalidInputError(f"modality must be 'image' or 'text', got {modality!r}")
        if int(k) < 1:
            raise InvalidInputError(f"k must be >= 1, got {k}")
        k = int(k)
        q = self._queries(queries)
        snap = self._snap
        nq = q.shape[0]
        all_ids: builtins.list[np.ndarray] = []
        all_scores: builtins.list[np.ndarray] = []
        for seg in snap.segments:
            part = seg.parts.get(modality)
            if part is None:
                continue
            dead = snap.dead.get((seg.record.id, modality))
            n = len(part.ids)
            fetch = min(n, k + snap.dead_count.get((seg.record.id, modality), 0))
            scores, pos = self._executor.search(part.handle, q, fetch, self._options)
            valid = pos >= 0
            safe = np.where(valid, pos, 0)
            if dead is not None:
                valid &= ~dead[safe]
            all_ids.append(np.where(valid, part.ids[safe], -1))
            all_scores.append(np.where(valid, scores, -np.inf).astype(np.float32))
        if not all_ids:
            return SearchResult(
                np.full((nq, k), -1, np.int64),
                np.full((nq, k), -np.inf, np.float32),
                snap.manifest.version,
                modality,
            )
        ids = np.concatenate(all_ids, axis=1)
        scores = np.concatenate(all_scores, axis=1)
        # sort by score desc, then id asc; invalid entries (-inf, -1) go last
        big = np.iinfo(np.int64).max
        order = np.lexsort((np.where(ids >= 0, ids, big), -scores), axis=-1)[:, :k]
        ids = np.take_along_axis(ids, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return SearchResult(ids.astype(np.int64), scores.astype(np.float32), snap.manifest.version, modality)

    def search_hits(self, query: np.ndarray, k: int, modality: Modality) -> builtins.list[Hit]:
        """:meth:`search` for one query vector, joined with the item rows."""
        res = self.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k, modality)
        row = res.row(0)
        items = self.get_many([i for i, _ in row])
        return [
            Hit(rank=r + 1, id=i, score=s, item=it)
            for r, ((i, s), it) in enumerate(zip(row, items, strict=True))
        ]

    def vectors(self, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of all live items of ``modality``, ids ascending."""
        snap = self._snap
        ids_l, vec_l = [], []
        for seg in snap.segments:
            part = seg.parts.get(modality)
            if part is None:
                continue
            dead = snap.dead.get((seg.record.id, modality))
            keep = slice(None) if dead is None else ~dead
            ids_l.append(part.ids[keep])
            vec_l.append(np.asarray(part.vectors[keep], dtype=np.float32))
        if not ids_l:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = np.concatenate(ids_l)
        vecs = np.concatenate(vec_l)
        order = np.argsort(ids, kind="stable")
        return ids[order], vecs[order]

    def get_vectors(self, ids: Sequence[int] | np.ndarray, modality: Modality) -> np.ndarray:
        """Stored embeddings of ``ids`` (float32 [len(ids), dim]); NotFoundError if any is not stored
        (or tombstoned) at this version."""
        snap = self._snap
        q = np.asarray(ids, dtype=np.int64).reshape(-1)
        sorted_ids, seg_idx, rows = snap.locator(modality)
        pos = np.searchsorted(sorted_ids, q)
        ok = pos < len(sorted_ids)
        ok[ok] = sorted_ids[pos[ok]] == q[ok]
        if len(snap.tombstones):
            ok &= ~np.isin(q, snap.tombstones)
        if not ok.all():
            raise NotFoundError(f"no stored {modality} vectors for ids {q[~ok][:10].tolist()}")
        out = np.empty((len(q), self.dim), np.float32)
        for s in np.unique(seg_idx[pos]) if len(q) else []:
            sel = np.nonzero(seg_idx[pos] == s)[0]
            out[sel] = snap.segments[int(s)].parts[modality].vectors[rows[pos[sel]]]
        return out

    @property
    def features(self) -> FeatureCache | None:
        """The rerank feature cache at this version, or None when the collection has none."""
        return self._snap.features

    # -- writing ---------------------------------------------------------------------------------------
    def writer(self) -> CollectionWriter:
        """Take the writer lock (ConflictError naming the holder's pid) and return a writer."""
        return CollectionWriter(self._root, self._options)

    def delete(self, ids: Sequence[int]) -> int:
        """Tombstone ``ids`` and commit (convenience over :meth:`writer`); returns the new version."""
        with self.writer() as w:
            w.delete(ids)
            v = w.commit()
        self.refresh()
        return v

    def compact(self, index_key: str | None = None) -> int:
        """Merge all segments into one, drop tombstones, re-derive FAISS indexes (optionally with a new
        ``index_key``) from the stored embeddings (no re-encoding); commit; returns the new version."""
        with self.writer() as w:
            v = w.compact(index_key)
        self.refresh()
        return v

    def close(self) -> None:
        with self._conns_lock:
            for db in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> Collection:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Collection({str(self._root)!r}, version={self.version})"


def create_collection(
    path: str | Path,
    encoder: ModelInfo,
    *,
    options: IndexOptions | None = None,
    reranker: ModelInfo | None = None,
) -> Collection:
    """Same as :meth:`Collection.create`."""
    return Collection.create(path, encoder, options=options, reranker=reranker)


def open_collection(
    path: str | Path, *, encoder: ModelInfo | None = None, options: IndexOptions | None = None
) -> Collection:
    """Same as :meth:`Collection.open`."""
    return Collection.open(path, encoder=encoder, options=options)


def is_collection(path: str | Path) -> bool:
    """True when ``path`` holds a committed manifest."""
    return (Path(path) / MANIFEST).is_file()
