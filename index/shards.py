"""Embedding shards on disk in clip-retrieval's layout, and their import into a collection.

The layout (what ``clip-retrieval inference`` writes; ``alignfuse build --engine ray`` writes the same)::

    <dir>/img_emb/img_emb_<k>.npy            float16/float32 [n_k, d] image embeddings
    <dir>/metadata/metadata_<k>.parquet      one row per image row: image_path, caption (optional), ...
    <dir>/text_emb/text_emb_<k>.npy          caption embeddings; clip-retrieval aligns row j with metadata row j
    <dir>/text_metadata/text_metadata_<k>.parquet   (alignfuse) when present, text_emb rows align with these
                                             rows instead (an image with several captions)
    <dir>/alignfuse.json                     (alignfuse) the dual encoder that made the embeddings

Shard ``k`` is complete once its ``metadata_<k>.parquet`` exists: :func:`write_shard` writes the arrays first and
the metadata last, each through a temporary name and a rename. Columns alignfuse adds (``uri``, ``sha256``,
``metadata``) are optional on import: without ``sha256`` an image row is keyed by the sha256 of its file's bytes
when ``image_path`` names a readable local file (the key a local build gives it), else by its uri.

Importing is the collection's one way in (:class:`~alignfuse.index.writer.CollectionWriter`): each shard is staged
and committed as one segment, so a shard is committed or absent, never half there, and items whose content hash is
already live are skipped (a re-run imports only what is missing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignfuse.errors import ConflictError, CorruptDataError, InvalidInputError, NotFoundError
from alignfuse.models.base import ModelInfo

from ._fs import fsync_dir
from ._shard_columns import column, extra_columns, file_sha256, read_vectors, uri_sha256
from .collection import Collection, CollectionWriter, is_collection
from .manifest import EncoderRecord
from .options import IndexOptions
from .sources import text_sha256
from .types import NewItem

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

ENCODER_FILE = "alignfuse.json"
_META_RE = re.compile(r"^metadata_(\d+)\.parquet$")
_RAY_HINT = "pip install 'alignfuse[ray]' (pyarrow)"
#: index of the per-shard segments of an import that merges them at its end
INTERIM_INDEX_KEY = "Flat"


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise InvalidInputError(f"embedding shards need pyarrow: {_RAY_HINT}") from exc
    return pa, pq


@dataclass(frozen=True)
class ShardData:
    """One shard in memory: image items + vectors and text items + vectors (row-aligned). A text item links
    to its image through ``metadata["image_uri"]``."""

    key: str
    images: tuple[NewItem, ...]
    image_vectors: np.ndarray
    texts: tuple[NewItem, ...]
    text_vectors: np.ndarray

    @property
    def count(self) -> int:
        return len(self.images) + len(self.texts)


@dataclass(frozen=True)
class ImportOptions:
    """``merge_at_end``: merge the segments of this import into one (index chosen for the total size).
    ``renormalize``: accept vectors that are not unit length (the writer normalises them) instead of failing.
    ``hash_files``: key image rows without a ``sha256`` column by their file's bytes when the file exists."""

    index: IndexOptions = field(default_factory=IndexOptions)
    merge_at_end: bool = True
    renormalize: bool = False
    hash_files: bool = True


@dataclass(frozen=True)
class ImportReport:
    collection: Path
    version: int
    shards: int
    added_images: int
    added_texts: int
    skipped_existing: int
    seconds: float

    @property
    def added(self) -> int:
        return self.added_images + self.added_texts


# -- paths ----------------------------------------------------------------------------------------------
def _paths(root: Path, key: str) -> dict[str, Path]:
    return {
        "img": root / "img_emb" / f"img_emb_{key}.npy",
        "meta": root / "metadata" / f"metadata_{key}.parquet",
        "txt": root / "text_emb" / f"text_emb_{key}.npy",
        "txt_meta": root / "text_metadata" / f"text_metadata_{key}.parquet",
    }


def list_shards(root: str | Path) -> list[str]:
    """Keys of the complete shards under ``root`` (those with a metadata parquet), in numeric order."""
    meta = Path(root) / "metadata"
    if not meta.is_dir():
        return []
    found = [m.group(1) for p in meta.iterdir() if (m := _META_RE.match(p.name))]
    return sorted(found, key=lambda k: (int(k), k))


def shard_key(number: int) -> str:
    return f"{number:06d}"


def remove_shard(root: str | Path, key: str) -> None:
    """Delete a shard's files (metadata first: a half-deleted shard is an incomplete one)."""
    p = _paths(Path(root), key)
    for name in ("meta", "txt_meta", "img", "txt"):
        with contextlib.suppress(FileNotFoundError):
            p[name].unlink()


def write_encoder_record(root: str | Path, info: ModelInfo) -> None:
    r = Path(root)
    r.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(r / ENCODER_FILE, json.dumps(EncoderRecord.from_info(info).to_json(), indent=2).encode())


def read_encoder_record(root: str | Path) -> EncoderRecord | None:
    p = Path(root) / ENCODER_FILE
    if not p.is_file():
        return None
    try:
        return EncoderRecord.from_json(json.loads(p.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptDataError(f"{p}: not an encoder record: {exc}") from exc


def info_from_record(rec: EncoderRecord) -> ModelInfo:
    """The ModelInfo a collection is created with, from a shard folder's encoder record."""
    if rec.preprocess is None:
        raise InvalidInputError(f"encoder record {rec.spec!r} has no preprocessing: give --model")
    return ModelInfo(
        spec=rec.spec,
        family=rec.family,
        arch=rec.arch,
        weights=rec.weights,
        weights_sha256=rec.weights_sha256,
        embed_dim=rec.embed_dim,
        preprocess=rec.preprocess,
    )


# -- writing --------------------------------------------------------------------------------------------
def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_table(path: Path, table: pa.Table) -> None:
    _, pq = _pa()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _table(items: Sequence[NewItem], *, image_path: Sequence[str]) -> pa.Table:
    pa, _ = _pa()
    return pa.table(
        {
            "image_path": pa.array(list(image_path), pa.string()),
            "caption": pa.array([it.text for it in items], pa.string()),
            "uri": pa.array([it.uri for it in items], pa.string()),
            "sha256": pa.array([it.sha256 for it in items], pa.string()),
            "metadata": pa.array(
                [json.dumps(dict(it.metadata), ensure_ascii=False, sort_keys=True) for it in items],
                pa.string(),
            ),
        }
    )


def write_shard(root: str | Path, data: ShardData) -> None:
    """Write one shard (arrays first, metadata last; each atomically)."""
    r = Path(root)
    p = _paths(r, data.key)
    _atomic_npy(p["img"], np.ascontiguousarray(data.image_vectors, np.float32))
    if data.texts:
        _atomic_npy(p["txt"], np.ascontiguousarray(data.text_vectors, np.float32))
        links = [str(t.metadata.get("image_uri", "")) for t in data.texts]
        _atomic_table(p["txt_meta"], _table(data.texts, image_path=links))
    _atomic_table(p["meta"], _table(data.images, image_path=[it.uri for it in data.images]))


# -- reading --------------------------------------------------------------------------------------------
def read_shard(
    root: str | Path, key: str, *, dim: int | None = None, options: ImportOptions | None = None
) -> ShardData:
    """One complete shard as items + vectors (dimension and normalisation checked)."""
    _, pq = _pa()
    opts = options or ImportOptions()
    r = Path(root)
    p = _paths(r, key)
    if not p["meta"].is_file():
        raise NotFoundError(f"shard {key}: {p['meta']} not found")
    meta = pq.read_table(p["meta"])
    paths = column(meta, "image_path") or column(meta, "url") or column(meta, "key")
    uris = column(meta, "uri") or paths
    captions = column(meta, "caption")
    if uris is None and captions is not None and p["txt"].is_file() and not p["img"].is_file():
        return _text_only_shard(key, meta, p["txt"], dim, opts)  # clip-retrieval --enable_image False
    if uris is None:
        raise InvalidInputError(f"{p['meta']}: needs an 'image_path' (or 'uri', 'url', 'key') column")
    n = meta.num_rows
    shas = column(meta, "sha256")
    metas = column(meta, "metadata")
    extra = extra_columns(meta)
    images: list[NewItem] = []
    for j in range(n):
        uri = str(uris[j])
        sha = shas[j] if shas is not None and shas[j] else None
        if sha is None and opts.hash_files and paths is not None and os.path.isfile(str(paths[j])):
            sha = file_sha256(str(paths[j]))
        md: dict[str, Any] = json.loads(metas[j]) if metas is not None and metas[j] else {}
        for name, values in extra.items():
            md.setdefault(name, values[j])
        cap = captions[j] if captions is not None else None
        images.append(NewItem("image", uri, sha or uri_sha256(uri), cap, md))
    img_vecs = (
        read_vectors(p["img"], n, dim, opts.renormalize)
        if p["img"].is_file()
        else np.zeros((0, dim or 0), np.float32)
    )
    if not p["img"].is_file() and n:
        raise InvalidInputError(f"shard {key}: {p['img']} is missing for {n} metadata rows")
    d = img_vecs.shape[1] if n else dim
    texts: list[NewItem] = []
    if p["txt_meta"].is_file():
        tm = pq.read_table(p["txt_meta"])
        t_caps, t_uris, t_links = column(tm, "caption"), column(tm, "uri"), column(tm, "image_path")
        t_sha, t_meta = column(tm, "sha256"), column(tm, "metadata")
        if t_caps is None or t_uris is None or t_links is None:
            raise InvalidInputError(f"{p['txt_meta']}: needs 'caption', 'uri' and 'image_path' columns")
        for j in range(tm.num_rows):
            link, cap = str(t_links[j]), str(t_caps[j])
            md = json.loads(t_meta[j]) if t_meta is not None and t_meta[j] else {"image_uri": link}
            sha = t_sha[j] if t_sha is not None and t_sha[j] else text_sha256(cap, link or None)
            texts.append(NewItem("text", str(t_uris[j]), sha, cap, md))
    elif p["txt"].is_file() and captions is not None:  # clip-retrieval: caption j of image row j
        for j, cap in enumerate(captions):
            link = images[j].uri
            texts.append(
                NewItem(
                    "text",
                    f"{link}#caption0",
                    text_sha256(str(cap), link),
                    str(cap),
                    {"image_uri": link, "caption_index": 0},
                )
            )
    txt_vecs = (
        read_vectors(p["txt"], len(texts), d, opts.renormalize)
        if texts
        else np.zeros((0, d or 0), np.float32)
    )
    return ShardData(key, tuple(images), img_vecs, tuple(texts), txt_vecs)


def _text_only_shard(key: str, meta: pa.Table, txt: Path, dim: int | None, opts: ImportOptions) -> ShardData:
    """clip-retrieval run on captions alone: metadata has ``caption`` (no image column), text_emb row j is
    caption j. The texts become items of their own (no image to link)."""
    captions = column(meta, "caption") or []
    extra = extra_columns(meta)
    texts = []
    for j, cap in enumerate(captions):
        md: dict[str, Any] = {name: values[j] for name, values in extra.items()}
        sha = text_sha256(str(cap), None)
        texts.append(NewItem("text", f"text:{sha[:16]}", sha, str(cap), md))
    vecs = read_vectors(txt, len(texts), dim, opts.renormalize)
    return ShardData(key, (), np.zeros((0, vecs.shape[1]), np.float32), tuple(texts), vecs)


# -- committing -----------------------------------------------------------------------------------------
def commit_shard(
    writer: CollectionWriter, data: ShardData, index_key: str | None = None
) -> tuple[int, int, int]:
    """Stage the shard's new items (content hash not yet live) and commit them as one version (its segment
    indexed with ``index_key`` when given, else the collection's choice). Returns (images, texts, skipped)."""
    skipped = 0

    def fresh(items: Sequence[NewItem]) -> list[int]:
        nonlocal skipped
        known = writer.known_sha256([it.sha256 for it in items])
        keep, seen = [], set()
        for j, it in enumerate(items):
            if it.sha256 in known or it.sha256 in seen:
                skipped += 1
                continue
            seen.add(it.sha256)
            keep.append(j)
        return keep

    uri_to_id: dict[str, int] = {}
    keep = fresh(data.images)
    if keep:
        new = [data.images[j] for j in keep]
        ids = writer.add(new, data.image_vectors[keep])
        uri_to_id.update({it.uri: int(i) for it, i in zip(new, ids.tolist(), strict=True)})
    keep_t = fresh(data.texts)
    if keep_t:
        links = [str(data.texts[j].metadata.get("image_uri", "")) for j in keep_t]
        missing = sorted({u for u in links if u and u not in uri_to_id})
        if missing:
            uri_to_id.update(writer.find_live_by_uri(missing, "image"))
        new_t = []
        for j, link in zip(keep_t, links, strict=True):
            it = data.texts[j]
            md = dict(it.metadata)
            if link in uri_to_id:
                md["image_item_id"] = uri_to_id[link]
            new_t.append(NewItem("text", it.uri, it.sha256, it.text, md))
        writer.add(new_t, data.text_vectors[keep_t])
    writer.commit(index_key)
    return len(keep), len(keep_t), skipped


def import_shards(
    collection: str | Path,
    shards: str | Path,
    *,
    encoder: ModelInfo | None = None,
    options: ImportOptions | None = None,
) -> ImportReport:
    """Import every complete shard under ``shards`` into ``collection`` (created when missing), one committed
    segment per shard. ``encoder``: the model that made the embeddings (default: the shard folder's
    ``alignfuse.json``); it must be the collection's encoder."""
    t0 = time.perf_counter()
    opts = options or ImportOptions()
    root, src = Path(collection), Path(shards)
    if not src.is_dir():
        raise NotFoundError(f"SHARDS: folder not found: {src}")
    keys = list_shards(src)
    if not keys:
        raise InvalidInputError(f"SHARDS: no metadata/metadata_*.parquet under {src}")
    rec = read_encoder_record(src)
    if encoder is None:
        if rec is None:
            raise InvalidInputError(
                f"--model: {src} does not record the model that made its embeddings; name it with --model"
            )
        encoder = info_from_record(rec)
    elif rec is not None and not rec.matches(encoder):
        raise InvalidInputError(f"--model: {src} was made by {rec.id}, not {encoder.spec!r}")
    if not is_collection(root):
        with contextlib.suppress(ConflictError):  # created meanwhile by another process
            Collection.create(root, encoder, options=opts.index).close()
    added_i = added_t = skipped = 0
    with CollectionWriter(root, opts.index) as writer:
        writer.check_encoder(encoder)
        start = writer.base_version
        # segments about to be merged get a Flat index (cheap, exact, searchable if the import stops
        # half-way): the merge builds the real one once, instead of one HNSW/IVF per shard thrown away
        interim = INTERIM_INDEX_KEY if opts.merge_at_end and len(keys) > 1 else None
        writer.auto_merge = not opts.merge_at_end  # this import merges its own segments at its end
        for key in keys:
            data = read_shard(src, key, dim=writer.dim, options=opts)
            a_i, a_t, s = commit_shard(writer, data, interim)
            added_i, added_t, skipped = added_i + a_i, added_t + a_t, skipped + s
            log.info("shard %s: added %d images, %d texts, skipped %d", key, a_i, a_t, s)
        ours = [sg.id for sg in writer.manifest.segments if sg.version > start]
        if opts.merge_at_end and (len(ours) > 1 or (interim and ours)):
            writer.merge(ours, reindex=True)
        writer.auto_merge = True
        writer.merge_small_segments()
        version = writer.base_version
    return ImportReport(root, version, len(keys), added_i, added_t, skipped, time.perf_counter() - t0)
