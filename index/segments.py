"""The files of a collection beside its item store: layout names, the manifest commit point, segments as a
reader loads them (ids, memory-mapped embeddings, FAISS index per modality) and as a writer stages them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignfuse.errors import CorruptDataError

from ._fs import NpyAppender, atomic_write, rmtree_quiet
from .ann import IndexHandle, SearchExecutor, load_index
from .features import FeatureCache
from .manifest import Manifest, SegmentRecord
from .options import IndexOptions
from .store import ITEMS_DB
from .types import Kind

MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
SUBDIRS = ("segments", "versions", "tombstones", "features")
#: names a collection folder may hold before its manifest exists (a creation killed half-way)
OWN_NAMES = {ITEMS_DB, f"{ITEMS_DB}-wal", f"{ITEMS_DB}-shm", f"{ITEMS_DB}-journal", LOCK_FILE, *SUBDIRS}


def segment_name(version: int) -> str:
    return f"seg-{version:06d}"


def versions_file(root: Path, version: int) -> Path:
    return root / "versions" / f"{version:06d}.json"


def write_manifest(root: Path, manifest: Manifest) -> None:
    """The commit point: switch ``manifest.json`` atomically, then record ``versions/<n>.json``."""
    data = manifest.dumps().encode("utf-8")
    atomic_write(root / MANIFEST, data)
    atomic_write(versions_file(root, manifest.version), data)


class SegmentPart:
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


class LoadedSegment:
    def __init__(self, root: Path, rec: SegmentRecord, options: IndexOptions, ex: SearchExecutor) -> None:
        self.record = rec
        self.parts: dict[str, SegmentPart] = {
            k: SegmentPart(root, rec, k, options, ex) for k, p in rec.parts if p.count > 0
        }


class Snapshot:
    """Everything a reader needs for one committed version. Immutable once built (lazy caches aside)."""

    def __init__(
        self,
        manifest: Manifest,
        segments: tuple[LoadedSegment, ...],
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


class StagedSegment:
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
