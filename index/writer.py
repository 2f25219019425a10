"""The one writer of a collection: staging, the commit protocol, rollback of what a killed writer left, merges,
compaction and garbage collection (see :mod:`alignfuse.index.collection` for the protocol).

One module over ~450 lines on purpose: these are one state machine over the same staged state (the staged
segment, deletes and feature rows, the sqlite rows at ``base + 1``), and its invariants read best in one place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from alignfuse.errors import (
    ConflictError,
    CorruptDataError,
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
    build_index,
    effective_index_key,
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
from .options import IndexOptions, choose_index_key, plan_merge
from .segments import (
    LOCK_FILE,
    MANIFEST,
    StagedSegment,
    segment_name,
    versions_file,
    write_manifest,
)
from .store import (
    SCHEMA,
    ShaLookup,
    chunks,
    connect_rw,
    live_counts,
)
from .types import KINDS, Kind, NewItem

log = logging.getLogger(__name__)

_BLOCK = 65536  # rows copied per step when a merge copies live vectors


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
        #: merge small segments after each commit (``options.merge_factor``); an import that merges its
        #: own segments at the end turns this off meanwhile
        self.auto_merge = True
        self._lock = WriterLock(self._root / LOCK_FILE).acquire()
        self._db: sqlite3.Connection | None = None
        try:
            self._manifest = Manifest.load(self._root / MANIFEST)
            self._db = connect_rw(self._root)
            self._db.executescript(SCHEMA)
            self._rollback_db()
            if not versions_file(self._root, self._manifest.version).exists():
                atomic_write(
                    versions_file(self._root, self._manifest.version), self._manifest.dumps().encode()
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
        self._seg: StagedSegment | None = None
        self._deletes: list[int] = []
        self._feat: tuple[NpyAppender, NpyAppender, EncoderRecord] | None = None
        self._next_id = self._manifest.next_id
        self._staged_sha: set[str] = set()
        self._staged_items = 0
        self._count_delta: Counter[str] = Counter()  # live items per kind (+ "deleted") since the base

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
        for part in chunks(rest):
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
        for part in chunks(list(uris)):
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
            self._seg = StagedSegment(self._root, segment_name(pending), self.dim)
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
        self._count_delta.update(it.kind for it in items)
        self._staged_sha.update(it.sha256 for it in items)
        return ids

    def delete(self, ids: Sequence[int]) -> None:
        """Stage tombstones (NotFoundError if an id is not a live item; nothing is staged then)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        db = self._conn()
        live: dict[int, str] = {}
        for part in chunks(wanted):
            q = ",".join("?" * len(part))
            live.update(
                (int(r[0]), str(r[1]))
                for r in db.execute(
                    f"SELECT id, kind FROM items WHERE id IN ({q}) AND state = 'live'", tuple(part)
                )
            )
        missing = [i for i in wanted if i not in live]
        if missing:
            raise NotFoundError(f"no live items {missing[:10]} in collection {self._root}")
        pending = self.base_version + 1
        db.execute("BEGIN")
        try:
            for part in chunks(wanted):
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
        for kind in live.values():
            self._count_delta[kind] -= 1
            self._count_delta["deleted"] += 1

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
        seg: StagedSegment,
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

    def _copy_live(self, seg: StagedSegment, records: Sequence[SegmentRecord], tomb: np.ndarray) -> None:
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

    def commit(self, index_key: str | None = None) -> int:
        """Write the staged segment/tombstones/features, fsync, switch the manifest; returns the version
        (the base version if nothing was staged). ``index_key`` overrides the index of this one segment
        (e.g. ``"Flat"`` for a segment that is about to be merged, whose real index the merge builds)."""
        if self.pending == 0 and self._seg is None:
            return self.base_version
        m = self._manifest
        v = m.version + 1
        segments = m.segments
        if self._seg is not None and self._seg.rows() > 0:
            totals = {k: a.rows + sum(r.count(k) for r in m.segments) for k, a in self._seg.vecs.items()}
            segments = (*segments, self._finish_segment(self._seg, v, override=index_key, totals=totals))
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
            counts=self._counts_after(m),
            next_id=self._next_id,
            features=features,
            reranker=reranker,
            committed_at=time.time(),
        )
        write_manifest(self._root, new)
        self._manifest = new
        self._reset_staged()
        log.debug("committed %s version %d", self._root, v)
        self._gc()
        return self.merge_small_segments() if self.auto_merge else v

    def merge_small_segments(self) -> int:
        """Apply the merge policy (:func:`~.options.plan_merge`) until it picks nothing, so that searches
        never fan out over an unbounded number of segments; returns the current version."""
        while True:
            segs = self._manifest.segments
            pick = plan_merge([s.count() for s in segs], self._options.merge_factor)
            if len(pick) < 2:
                return self._manifest.version
            log.info("merge policy: merging %d segments of %s", len(pick), self._root)
            self.merge([segs[i].id for i in pick])

    def _counts_after(self, m: Manifest) -> tuple[tuple[str, int], ...]:
        """The manifest's counts plus what this commit changes: O(changes), not a scan of the items (an add
        must not cost O(N)); recounted from sqlite (:func:`~.store.live_counts`) when the base lacks them."""
        base = dict(m.counts)
        if not {"image", "text", "deleted"} <= set(base):
            return live_counts(self._conn(), m.version + 1)
        return tuple((k, base[k] + self._count_delta.get(k, 0)) for k in ("image", "text", "deleted"))

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
        seg = StagedSegment(self._root, segment_name(v), self.dim)
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
        write_manifest(self._root, new)
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

    def merge(self, segment_ids: Sequence[str], *, reindex: bool = False) -> int:
        """Commit staged changes, then merge the named segments into one (their tombstoned rows dropped;
        cost proportional to their size, not the collection's). The builder merges the segments of its
        periodic commits this way. Tombstones and the feature cache are left to :meth:`compact`.
        ``reindex``: also rewrite a single named segment (its index re-chosen for the collection's size).
        Returns the new version (the current one when fewer than two segments are named, or none)."""
        self.commit()
        m = self._manifest
        wanted = set(segment_ids)
        unknown = wanted - {s.id for s in m.segments}
        if unknown:
            raise NotFoundError(f"no segments {sorted(unknown)} in collection {self._root}")
        chosen = [s for s in m.segments if s.id in wanted]
        if len(chosen) < (1 if reindex else 2):
            return m.version
        v = m.version + 1
        seg = StagedSegment(self._root, segment_name(v), self.dim)
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
        write_manifest(self._root, new)
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
            # O(uncommitted rows), never a scan of the collection (a writer opens on every add): staged rows
            # have ids from the manifest's next_id up (primary key range); uncommitted deletes are found
            # through the index on version_deleted
            gone = db.execute(
                "DELETE FROM items WHERE id >= ? AND version_added > ?", (self._manifest.next_id, v)
            ).rowcount
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
        prev = versions_file(self._root, self._manifest.version - 1)
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
