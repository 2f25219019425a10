"""A collection on disk: manifest + items.sqlite + immutable segments + optional feature cache.

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
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
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

from ._fs import (
    NpyAppender,
    WriterLock,
    atomic_write,
    fsync_dir,
    fsync_file,
    rmtree_quiet,
    save_npy_durable,
)
from .ann import (
    IndexHandle,
    SearchExecutor,
    build_index,
    effective_index_key,
    get_executor,
    load_index,
    save_index,
    validate_index_key,
)
from .features import FeatureCache
from .manifest import (
    EncoderRecord,
    FeatureChunk,
    FeaturesRecord,
    Manifest,
    ModalityPart,
    SegmentRecord,
)
from .options import IndexOptions, choose_index_key
from .types import KINDS, Hit, Item, Kind, Modality, NewItem, SearchResult

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ITEMS_DB = "items.sqlite"
LOCK_FILE = "writer.lock"
SUBDIRS = ("segments", "versions", "tombstones", "features")
_OWN_NAMES = {ITEMS_DB, f"{ITEMS_DB}-wal", f"{ITEMS_DB}-shm", f"{ITEMS_DB}-journal", LOCK_FILE, *SUBDIRS}
_SQL_CHUNK = 900
_BLOCK = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    text TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleted')),
    version_added INTEGER NOT NULL,
    version_deleted INTEGER
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE INDEX IF NOT EXISTS items_kind ON items (kind, id);
CREATE INDEX IF NOT EXISTS items_uri ON items (uri);
"""
_COLUMNS = "id, kind, uri, sha256, text, metadata, version_added, version_deleted"
_VISIBLE = "version_added <= :v"
_LIVE = "version_added <= :v AND (version_deleted IS NULL OR version_deleted > :v)"


def _seg_name(version: int) -> str:
    return f"seg-{version:06d}"


def _versions_file(root: Path, version: int) -> Path:
    return root / "versions" / f"{version:06d}.json"


def _row_to_item(row: tuple[Any, ...], version: int) -> Item:
    vd = row[7] if row[7] is not None and row[7] <= version else None
    return Item(
        id=int(row[0]),
        kind=row[1],
        uri=row[2],
        sha256=row[3],
        text=row[4],
        metadata=json.loads(row[5]) if row[5] else {},
        state="deleted" if vd is not None else "live",
        version_added=int(row[6]),
        version_deleted=vd,
    )


def _connect_rw(root: Path) -> sqlite3.Connection:
    db = sqlite3.connect(root / ITEMS_DB, timeout=30.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _connect_ro(root: Path) -> sqlite3.Connection:
    uri = (root / ITEMS_DB).resolve().as_uri() + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
    db.execute("PRAGMA query_only=ON")
    return db


def _counts(db: sqlite3.Connection, version: int) -> tuple[tuple[str, int], ...]:
    live = dict(db.execute(f"SELECT kind, COUNT(*) FROM items WHERE {_LIVE} GROUP BY kind", {"v": version}))
    deleted = db.execute(
        "SELECT COUNT(*) FROM items WHERE version_added <= :v AND version_deleted <= :v", {"v": version}
    ).fetchone()[0]
    return (
        ("image", int(live.get("image", 0))),
        ("text", int(live.get("text", 0))),
        ("deleted", int(deleted)),
    )


def _chunks(seq: Sequence[Any], n: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class ShaLookup:
    """Picklable check "is this content hash committed live at ``version``?" that opens its own read-only
    sqlite connection lazily (usable inside DataLoader worker processes)."""

    def __init__(self, root: Path, version: int) -> None:
        self.root = Path(root)
        self.version = version
        self._db: sqlite3.Connection | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "version": self.version, "_db": None, "_pid": -1}

    def known(self, sha256s: Sequence[str]) -> set[str]:
        if self.version <= 0 or not sha256s:
            return set()
        if self._db is None or self._pid != os.getpid():
            self._db = _connect_ro(self.root)
            self._pid = os.getpid()
        found: set[str] = set()
        for part in _chunks(list(sha256s)):
            q = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT sha256 FROM items WHERE sha256 IN ({q}) AND version_added <= ? "
                "AND (version_deleted IS NULL OR version_deleted > ?)",
                (*part, self.version, self.version),
            )
            found.update(r[0] for r in rows)
        return found


# ------------------------------------------------------------------------------------------------------
# reading


class _Part:
    """One modality of a loaded segment: item ids (row-aligned), embeddings (memory-mapped), FAISS index."""

    def __init__(self, root: Path, seg: SegmentRecord, kind: Kind, options: IndexOptions, ex: SearchExecutor):
        part = seg.part(kind)
        assert part is not None
        d = root / "segments" / seg.id
        self.kind = kind
        self.key = part.index_key
        self.ids = np.load(d / f"{kind}.ids.npy").astype(np.int64, copy=False)
        self.vectors = np.load(d / f"{kind}.npy", mmap_mode="r")
        if self.ids.shape[0] != part.count or self.vectors.shape[0] != part.count:
            raise CorruptDataError(
                f"segment {d} {kind}: manifest says {part.count} vectors, files hold "
                f"{self.ids.shape[0]} ids / {self.vectors.shape[0]} vectors"
            )
        cpu = load_index(d / f"{kind}.faiss", part.index_key, options)
        if cpu.ntotal != part.count:
            raise CorruptDataError(
                f"segment {d} {kind}: index holds {cpu.ntotal} vectors, expected {part.count}"
            )
        self.handle: IndexHandle = ex.prepare(cpu, options)


class _Segment:
    def __init__(self, root: Path, rec: SegmentRecord, options: IndexOptions, ex: SearchExecutor) -> None:
        self.record = rec
        self.parts: dict[str, _Part] = {
            k: _Part(root, rec, k, options, ex) for k, p in rec.parts if p.count > 0
        }


class _Snapshot:
    """Everything a reader needs for one committed version. Immutable once built (lazy caches aside)."""

    def __init__(
        self,
        manifest: Manifest,
        segments: tuple[_Segment, ...],
        tombstones: np.ndarray,
        features: FeatureCache | None,
    ) -> None:
        self.manifest = manifest
        self.segments = segments
        self.tombstones = tombstones
        self.features = features
        self.dead: dict[tuple[str, str], np.ndarray] = {}  # positions tombstoned, per (segment, kind)
        self.dead_count: dict[tuple[str, str], int] = {}
        for seg in segments:
            for kind, part in seg.parts.items():
                if len(tombstones):
                    mask = np.isin(part.ids, tombstones)
                    if mask.any():
                        self.dead[(seg.record.id, kind)] = mask
                        self.dead_count[(seg.record.id, kind)] = int(mask.sum())
        self._locator: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def locator(self, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted ids, segment index, row) of every stored vector of ``kind`` (tombstoned included)."""
        loc = self._locator.get(kind)
        if loc is None:
            ids, segs, rows = [], [], []
            for i, seg in enumerate(self.segments):
                part = seg.parts.get(kind)
                if part is None:
                    continue
                ids.append(part.ids)
                segs.append(np.full(len(part.ids), i, np.int32))
                rows.append(np.arange(len(part.ids), dtype=np.int64))
            a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            s = np.concatenate(segs) if segs else np.zeros(0, np.int32)
            r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            order = np.argsort(a, kind="stable")
            loc = (a[order], s[order], r[order])
            self._locator[kind] = loc
        return loc


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
        self._segments: dict[str, _Segment] = {}
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
        strangers = sorted(p.name for p in root.iterdir() if p.name not in _OWN_NAMES)
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
            db = _connect_rw(root)
            try:
                db.executescript(_SCHEMA)
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
            _write_manifest(root, manifest)
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
            return Manifest.load(_versions_file(self._root, version))
        except FileNotFoundError:
            raise NotFoundError(f"collection {self._root} has no committed version {version}") from None

    def _build_snapshot(self, m: Manifest) -> _Snapshot:
        if m.encoder.embed_dim <= 0:
            raise CorruptDataError(f"manifest of {self._root} has no embedding dimension")
        segs = []
        for rec in m.segments:
            seg = self._segments.get(rec.id)
            if seg is None or seg.record != rec:
                seg = _Segment(self._root, rec, self._options, self._executor)
            segs.append(seg)
        tomb = np.zeros(0, np.int64)
        if m.tombstones:
            tomb = np.load(self._root / m.tombstones).astype(np.int64, copy=False)
        features = None
        if m.features is not None and m.features.chunks:
            features = FeatureCache(self._root / "features", m.features, tomb)
        self._segments = {s.record.id: s for s in segs}
        return _Snapshot(m, tuple(segs), tomb, features)

    def _load(self, version: int | None) -> _Snapshot:
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
            db = _connect_ro(self._root)
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def count(self, kind: Kind | None = None, *, include_deleted: bool = False) -> int:
        """Items (of ``kind``) at this version: live ones, plus deleted ones when ``include_deleted``."""
        where = _VISIBLE if include_deleted else _LIVE
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
                f"SELECT {_COLUMNS} FROM items WHERE id = :id AND {_VISIBLE}", {"id": int(item_id), "v": v}
            )
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"no item {int(item_id)} in collection {self._root}")
        return _row_to_item(row, v)

    def get_many(self, ids: Sequence[int] | np.ndarray) -> builtins.list[Item]:
        """Items in the order of ``ids`` (NotFoundError if any is unknown at this version)."""
        v = self.version
        wanted = [int(i) for i in ids]
        found: dict[int, Item] = {}
        db = self._db()
        for part in _chunks(sorted(set(wanted))):
            q = ",".join("?" * len(part))
            for row in db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE id IN ({q}) AND version_added <= ?", (*part, v)
            ):
                found[int(row[0])] = _row_to_item(row, v)
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
        where = _VISIBLE if include_deleted else _LIVE
        args: dict[str, Any] = {"v": v, "limit": limit, "offset": offset}
        if kind is not None:
            where += " AND kind = :kind"
            args["kind"] = kind
        rows = self._db().execute(
            f"SELECT {_COLUMNS} FROM items WHERE {where} ORDER BY id LIMIT :limit OFFSET :offset", args
        )
        return [_row_to_item(r, v) for r in rows]

    def find_by_sha256(self, sha256: str, kind: Kind | None = None) -> Item | None:
        """The live item with this content hash, if any (lowest id)."""
        v = self.version
        args: dict[str, Any] = {"v": v, "sha": sha256}
        where = f"sha256 = :sha AND {_LIVE}"
        if kind is not None:
            where += " AND kind = :kind"
            args["kind"] = kind
        row = (
            self._db()
            .execute(f"SELECT {_COLUMNS} FROM items WHERE {where} ORDER BY id LIMIT 1", args)
            .fetchone()
        )
        return None if row is None else _row_to_item(row, v)

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


# ------------------------------------------------------------------------------------------------------
# writing


def _write_manifest(root: Path, manifest: Manifest) -> None:
    """The commit point: switch ``manifest.json`` atomically, then record ``versions/<n>.json``."""
    data = manifest.dumps().encode("utf-8")
    atomic_write(root / MANIFEST, data)
    atomic_write(_versions_file(root, manifest.version), data)


class _StagedSegment:
    def __init__(self, root: Path, name: str, dim: int) -> None:
        self.dir = root / "segments" / name
        rmtree_quiet(self.dir)
        self.dir.mkdir(parents=True)
        self.name = name
        self.dim = dim
        self.vecs: dict[str, NpyAppender] = {}
        self.ids: dict[str, NpyAppender] = {}

    def append(self, kind: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        if kind not in self.vecs:
            self.vecs[kind] = NpyAppender(self.dir / f"{kind}.npy", np.float32, (self.dim,))
            self.ids[kind] = NpyAppender(self.dir / f"{kind}.ids.npy", np.int64, ())
        self.vecs[kind].append(vectors)
        self.ids[kind].append(ids)

    def rows(self) -> int:
        return sum(a.rows for a in self.vecs.values())

    def abort(self) -> None:
        for a in (*self.vecs.values(), *self.ids.values()):
            a.abort()
        rmtree_quiet(self.dir)


class CollectionWriter:
    """The one writer of a collection (holds ``writer.lock``). Use as a context manager.

    Staged changes (``add``, ``delete``, ``put_features``) become visible to readers only at
    :meth:`commit`. Leaving the ``with`` block without committing (or on an exception) rolls the staged
    changes back; a SIGKILL leaves them uncommitted and the next writer rolls them back.
    """

    def __init__(self, root: Path, options: IndexOptions | None = None) -> None:
        self._root = Path(root)
        if not (self._root / MANIFEST).is_file():
            raise NotFoundError(f"collection not found: {self._root}")
        self._options = options or IndexOptions()
        self._lock = WriterLock(self._root / LOCK_FILE).acquire()
        self._db: sqlite3.Connection | None = None
        try:
            self._manifest = Manifest.load(self._root / MANIFEST)
            self._db = _connect_rw(self._root)
            self._db.executescript(_SCHEMA)
            self._rollback_db()
            if not _versions_file(self._root, self._manifest.version).exists():
                atomic_write(
                    _versions_file(self._root, self._manifest.version), self._manifest.dumps().encode()
                )
            self._gc()
        except BaseException:
            if self._db is not None:
                self._db.close()
            self._lock.release()
            raise
        self._reset_staged()

    # -- state -----------------------------------------------------------------------------------------
    def _reset_staged(self) -> None:
        self._seg: _StagedSegment | None = None
        self._deletes: list[int] = []
        self._feat: tuple[NpyAppender, NpyAppender, EncoderRecord] | None = None
        self._next_id = self._manifest.next_id
        self._staged_sha: set[str] = set()
        self._staged_items = 0

    @property
    def path(self) -> Path:
        return self._root

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the writer lock (forked worker processes close it)."""
        return self._lock.fd

    @property
    def manifest(self) -> Manifest:
        """The last committed manifest."""
        return self._manifest

    @property
    def base_version(self) -> int:
        """The committed version this writer builds on."""
        return self._manifest.version

    @property
    def dim(self) -> int:
        return self._manifest.encoder.embed_dim

    @property
    def pending(self) -> int:
        """Items staged since the last commit (adds + deletes + feature rows)."""
        feats = self._feat[0].rows if self._feat is not None else 0
        return self._staged_items + len(self._deletes) + feats

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ConflictError("collection writer is closed")
        return self._db

    def check_encoder(self, encoder: ModelInfo) -> None:
        self._manifest.encoder.check(encoder, what="dual encoder", collection=str(self._root))

    def sha_lookup(self) -> ShaLookup:
        """A picklable committed-hash checker at the base version (for worker processes)."""
        return ShaLookup(self._root, self._manifest.version)

    def known_sha256(self, sha256s: Sequence[str]) -> set[str]:
        """Those of ``sha256s`` that are live in the collection (committed or staged by this writer)."""
        found = {s for s in sha256s if s in self._staged_sha}
        rest = [s for s in sha256s if s not in found]
        db = self._conn()
        for part in _chunks(rest):
            q = ",".join("?" * len(part))
            rows = db.execute(
                f"SELECT sha256 FROM items WHERE sha256 IN ({q}) AND state = 'live'", tuple(part)
            )
            found.update(r[0] for r in rows)
        return found

    def find_live_by_uri(self, uris: Sequence[str], kind: Kind) -> dict[str, int]:
        """uri → id of live items (committed or staged) of ``kind``."""
        out: dict[str, int] = {}
        db = self._conn()
        for part in _chunks(list(uris)):
            q = ",".join("?" * len(part))
            for uri, i in db.execute(
                f"SELECT uri, id FROM items WHERE uri IN ({q}) AND kind = ? AND state = 'live' ORDER BY id DESC",
                (*part, kind),
            ):
                out[uri] = int(i)
        return out

    # -- staging ---------------------------------------------------------------------------------------
    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> np.ndarray:
        """Stage items with their embeddings (float32 [n, dim], row-aligned; re-normalised to unit length);
        returns their int64 ids (consecutive, in order)."""
        n = len(items)
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape != (n, self.dim):
            raise InvalidInputError(f"expected vectors of shape ({n}, {self.dim}), got {v.shape}")
        if n == 0:
            return np.zeros(0, np.int64)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        if not np.isfinite(v).all() or (norms <= 0).any():
            raise InvalidInputError("vectors must be finite and non-zero")
        v = v / norms
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        pending = self.base_version + 1
        rows = []
        for i, it in zip(ids.tolist(), items, strict=True):
            if it.kind not in KINDS:
                raise InvalidInputError(f"item kind must be 'image' or 'text', got {it.kind!r}")
            try:
                meta = json.dumps(dict(it.metadata), ensure_ascii=False, sort_keys=True)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"metadata of {it.uri} is not JSON-serialisable: {exc}") from exc
            rows.append((i, it.kind, it.uri, it.sha256, it.text, meta, "live", pending))
        if self._seg is None:
            self._seg = _StagedSegment(self._root, _seg_name(pending), self.dim)
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO items (id, kind, uri, sha256, text, metadata, state, version_added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        kinds = np.array([it.kind for it in items])
        for kind in KINDS:
            sel = np.nonzero(kinds == kind)[0]
            if len(sel):
                self._seg.append(kind, ids[sel], v[sel])
        self._next_id += n
        self._staged_items += n
        self._staged_sha.update(it.sha256 for it in items)
        return ids

    def delete(self, ids: Sequence[int]) -> None:
        """Stage tombstones (NotFoundError if an id is not a live item; nothing is staged then)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        db = self._conn()
        live: set[int] = set()
        for part in _chunks(wanted):
            q = ",".join("?" * len(part))
            live.update(
                int(r[0])
                for r in db.execute(f"SELECT id FROM items WHERE id IN ({q}) AND state = 'live'", tuple(part))
            )
        missing = [i for i in wanted if i not in live]
        if missing:
            raise NotFoundError(f"no live items {missing[:10]} in collection {self._root}")
        pending = self.base_version + 1
        db.execute("BEGIN")
        try:
            for part in _chunks(wanted):
                q = ",".join("?" * len(part))
                db.execute(
                    f"UPDATE items SET state = 'deleted', version_deleted = ? WHERE id IN ({q})",
                    (pending, *part),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._deletes.extend(wanted)

    def put_features(self, ids: Sequence[int] | np.ndarray, tokens: np.ndarray, reranker: ModelInfo) -> None:
        """Stage rerank-cache tokens (fp16 [n, L, D]) for image ``ids`` computed by ``reranker``."""
        ids_a = np.asarray(ids, dtype=np.int64).reshape(-1)
        t = np.asarray(tokens)
        if t.ndim != 3 or t.shape[0] != len(ids_a):
            raise InvalidInputError(f"tokens must have shape [{len(ids_a)}, L, D], got {t.shape}")
        rec = EncoderRecord.from_info(reranker)
        current = (
            self._manifest.features.reranker
            if self._manifest.features is not None
            else self._manifest.reranker
        )
        if current is not None and not current.matches(reranker):
            current.check(reranker, what="reranker (feature cache)", collection=str(self._root))
        shape = (int(t.shape[1]), int(t.shape[2]))
        if self._manifest.features is not None and self._manifest.features.token_shape != shape:
            raise InvalidInputError(
                f"feature tokens of shape {shape} do not match the cache's {self._manifest.features.token_shape}"
            )
        if self._feat is None:
            base = self._root / "features" / f"f{self.base_version + 1:06d}"
            self._feat = (
                NpyAppender(base.with_name(base.name + ".npy"), np.float16, shape),
                NpyAppender(base.with_name(base.name + ".ids.npy"), np.int64, ()),
                rec,
            )
        elif self._feat[0].tail != shape:
            raise InvalidInputError(
                f"feature tokens of shape {shape} do not match staged {self._feat[0].tail}"
            )
        self._feat[0].append(t.astype(np.float16, copy=False))
        self._feat[1].append(ids_a)

    # -- committing ------------------------------------------------------------------------------------
    def _key_for(self, kind: str, total: int, override: str | None = None) -> str:
        requested = override or self._manifest.index_key
        if requested:
            return requested
        return choose_index_key(total, self.dim, self._options.memory_budget_bytes)

    def _finish_segment(
        self,
        seg: _StagedSegment,
        version: int,
        override: str | None = None,
        totals: dict[str, int] | None = None,
    ) -> SegmentRecord:
        """Close the staged files, build each modality's FAISS index, fsync. The automatic index key is
        chosen from ``totals[kind]`` (the collection's size after this change), then downgraded to Flat when
        this segment is too small to train it."""
        parts: list[tuple[Kind, ModalityPart]] = []
        for kind in KINDS:
            if kind not in seg.vecs:
                continue
            seg.vecs[kind].close()
            seg.ids[kind].close()
            n = seg.vecs[kind].rows
            total = (totals or {}).get(kind, n)
            key = effective_index_key(self._key_for(kind, total, override), n, self.dim)
            vectors = np.load(seg.dir / f"{kind}.npy", mmap_mode="r")
            index = build_index(vectors, key, self._options)
            save_index(index, seg.dir / f"{kind}.faiss")
            fsync_file(seg.dir / f"{kind}.faiss")
            parts.append((kind, ModalityPart(n, key)))
            del vectors, index
        fsync_dir(seg.dir)
        fsync_dir(seg.dir.parent)
        return SegmentRecord(id=seg.name, version=version, parts=tuple(parts))

    def _copy_live(self, seg: _StagedSegment, records: Sequence[SegmentRecord], tomb: np.ndarray) -> None:
        """Append the non-tombstoned rows of ``records`` to ``seg``, block by block (bounded memory)."""
        for rec in records:
            d = self._root / "segments" / rec.id
            for kind, part in rec.parts:
                if part.count == 0:
                    continue
                ids = np.load(d / f"{kind}.ids.npy").astype(np.int64, copy=False)
                vecs = np.load(d / f"{kind}.npy", mmap_mode="r")
                keep = ~np.isin(ids, tomb) if len(tomb) else np.ones(len(ids), bool)
                for start in range(0, len(ids), _BLOCK):
                    sl = slice(start, start + _BLOCK)
                    k = keep[sl]
                    if k.any():
                        seg.append(kind, ids[sl][k], np.asarray(vecs[sl])[k])

    def _load_tombstones(self) -> np.ndarray:
        if not self._manifest.tombstones:
            return np.zeros(0, np.int64)
        return np.load(self._root / self._manifest.tombstones).astype(np.int64, copy=False)

    def commit(self) -> int:
        """Write the staged segment/tombstones/features, fsync, switch the manifest; returns the version
        (the base version if nothing was staged)."""
        if self.pending == 0 and self._seg is None:
            return self.base_version
        m = self._manifest
        v = m.version + 1
        segments = m.segments
        if self._seg is not None and self._seg.rows() > 0:
            totals = {k: a.rows + sum(r.count(k) for r in m.segments) for k, a in self._seg.vecs.items()}
            segments = (*segments, self._finish_segment(self._seg, v, totals=totals))
        elif self._seg is not None:
            self._seg.abort()
        tomb_path, tomb_count = m.tombstones, m.tombstone_count
        if self._deletes:
            tomb = np.union1d(self._load_tombstones(), np.asarray(self._deletes, np.int64))
            tomb_path = f"tombstones/{v:06d}.npy"
            save_npy_durable(self._root / tomb_path, tomb)
            fsync_dir(self._root / "tombstones")
            tomb_count = int(len(tomb))
        features = m.features
        reranker = m.reranker
        if self._feat is not None:
            toks, ids, rec = self._feat
            toks.close()
            ids.close()
            fsync_dir(self._root / "features")
            if toks.rows:
                chunk = FeatureChunk(toks.path.name[: -len(".npy")], toks.rows)
                shape = (toks.tail[0], toks.tail[1])
                if features is None:
                    features = FeaturesRecord(reranker=rec, token_shape=shape, chunks=(chunk,))
                else:
                    features = FeaturesRecord(
                        features.reranker, features.token_shape, (*features.chunks, chunk)
                    )
                reranker = reranker or rec
        new = m.with_(
            version=v,
            segments=segments,
            tombstones=tomb_path,
            tombstone_count=tomb_count,
            counts=_counts(self._conn(), v),
            next_id=self._next_id,
            features=features,
            reranker=reranker,
            committed_at=time.time(),
        )
        _write_manifest(self._root, new)
        self._manifest = new
        self._reset_staged()
        log.debug("committed %s version %d", self._root, v)
        self._gc()
        return v

    def compact(self, index_key: str | None = None) -> int:
        """Commit staged changes, then merge every segment into one: tombstoned vectors are dropped and the
        FAISS indexes are re-derived from the stored embeddings (``index_key`` overrides and is recorded as
        the collection's key). Returns the new version."""
        if index_key is not None:
            index_key = validate_index_key(index_key, self.dim)
        self.commit()
        m = self._manifest
        v = m.version + 1
        tomb = self._load_tombstones()
        seg = _StagedSegment(self._root, _seg_name(v), self.dim)
        try:
            self._copy_live(seg, m.segments, tomb)
            key = index_key or m.index_key
            segments: tuple[SegmentRecord, ...] = ()
            if seg.rows() > 0:
                segments = (self._finish_segment(seg, v, override=key),)
            else:
                seg.abort()
            features = self._compact_features(m, tomb, v)
        except BaseException:
            seg.abort()
            raise
        new = m.with_(
            version=v,
            segments=segments,
            tombstones=None,
            tombstone_count=0,
            index_key=key,
            features=features,
            committed_at=time.time(),
        )
        _write_manifest(self._root, new)
        self._manifest = new
        self._reset_staged()
        self._gc()
        log.info(
            "compacted %s into version %d (%d segments -> %d, %d tombstones dropped)",
            self._root,
            v,
            len(m.segments),
            len(segments),
            len(tomb),
        )
        return v

    def merge(self, segment_ids: Sequence[str]) -> int:
        """Commit staged changes, then merge the named segments into one (their tombstoned rows dropped;
        cost proportional to their size, not the collection's). The builder merges the segments of its
        periodic commits this way. Tombstones and the feature cache are left to :meth:`compact`.
        Returns the new version (the current one when fewer than two segments are named)."""
        self.commit()
        m = self._manifest
        wanted = set(segment_ids)
        unknown = wanted - {s.id for s in m.segments}
        if unknown:
            raise NotFoundError(f"no segments {sorted(unknown)} in collection {self._root}")
        chosen = [s for s in m.segments if s.id in wanted]
        if len(chosen) < 2:
            return m.version
        v = m.version + 1
        seg = _StagedSegment(self._root, _seg_name(v), self.dim)
        try:
            self._copy_live(seg, chosen, self._load_tombstones())
            rest = [s for s in m.segments if s.id not in wanted]
            totals = {k: a.rows + sum(r.count(k) for r in rest) for k, a in seg.vecs.items()}
            merged = self._finish_segment(seg, v, totals=totals) if seg.rows() else None
        except BaseException:
            seg.abort()
            raise
        if merged is None:
            seg.abort()
        first = m.segments.index(chosen[0])
        segments = [s for s in m.segments[:first] if s.id not in wanted]
        segments += [merged] if merged is not None else []
        segments += [s for s in m.segments[first:] if s.id not in wanted]
        new = m.with_(version=v, segments=tuple(segments), committed_at=time.time())
        _write_manifest(self._root, new)
        self._manifest = new
        self._reset_staged()
        self._gc()
        log.info("merged %d segments of %s into %s (version %d)", len(chosen), self._root, seg.name, v)
        return v

    def _compact_features(self, m: Manifest, tomb: np.ndarray, v: int) -> FeaturesRecord | None:
        if m.features is None or not m.features.chunks:
            return m.features
        cache = FeatureCache(self._root / "features", m.features, tomb)
        ids = cache.ids()
        base = self._root / "features" / f"f{v:06d}"
        toks = NpyAppender(base.with_name(base.name + ".npy"), np.float16, m.features.token_shape)
        ida = NpyAppender(base.with_name(base.name + ".ids.npy"), np.int64, ())
        for start in range(0, len(ids), 4096):
            part = ids[start : start + 4096]
            toks.append(cache.get(part))
            ida.append(part)
        toks.close()
        ida.close()
        fsync_dir(self._root / "features")
        chunks = (FeatureChunk(base.name, len(ids)),) if len(ids) else ()
        return FeaturesRecord(m.features.reranker, m.features.token_shape, chunks)

    # -- rollback / cleanup ----------------------------------------------------------------------------
    def _rollback_db(self) -> None:
        db = self._conn()
        v = self._manifest.version
        db.execute("BEGIN")
        try:
            gone = db.execute("DELETE FROM items WHERE version_added > ?", (v,)).rowcount
            back = db.execute(
                "UPDATE items SET state = 'live', version_deleted = NULL WHERE version_deleted > ?", (v,)
            ).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if gone or back:
            log.info("rolled back %d uncommitted rows and %d deletes in %s", gone, back, self._root)

    def rollback(self) -> None:
        """Discard staged changes."""
        if self._seg is not None:
            self._seg.abort()
        if self._feat is not None:
            self._feat[0].abort()
            self._feat[1].abort()
        if self._db is not None:
            self._rollback_db()
        self._reset_staged()

    def _referenced(self) -> tuple[set[str], set[str], set[str]]:
        """Segment ids, tombstone files and feature chunks of the current and the previous version."""
        segs: set[str] = set()
        tombs: set[str] = set()
        feats: set[str] = set()
        manifests = [self._manifest]
        prev = _versions_file(self._root, self._manifest.version - 1)
        with contextlib.suppress(FileNotFoundError, CorruptDataError):
            manifests.append(Manifest.load(prev))
        for m in manifests:
            segs.update(s.id for s in m.segments)
            if m.tombstones:
                tombs.add(Path(m.tombstones).name)
            if m.features is not None:
                feats.update(c.id for c in m.features.chunks)
        return segs, tombs, feats

    def _gc(self) -> None:
        """Remove files no committed version among the last two references (leftovers of killed writers,
        segments merged away). Readers holding them open keep working; a reader that loads a removed file
        retries with the newest manifest."""
        segs, tombs, feats = self._referenced()
        for d in (self._root / "segments").iterdir():
            if d.name not in segs:
                rmtree_quiet(d)
        for f in (self._root / "tombstones").iterdir():
            if f.name not in tombs:
                f.unlink(missing_ok=True)
        for f in (self._root / "features").iterdir():
            stem = f.name.split(".")[0]
            if stem not in feats:
                f.unlink(missing_ok=True)
        for f in (*self._root.glob("*.tmp"), *(self._root / "versions").glob("*.tmp")):
            f.unlink(missing_ok=True)

    def close(self) -> None:
        """Roll back anything uncommitted and release the lock."""
        if not self._lock.held:
            return
        try:
            self.rollback()
        finally:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._lock.release()

    def __enter__(self) -> CollectionWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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
