"""Streaming builder: sources → (DataLoader workers: read, hash, decode, transform) → batched encoding →
segments committed every ``commit_every`` items. A killed build resumes: items whose content sha256 is
already committed are skipped before decoding/encoding."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from alignfuse.errors import ConflictError, InvalidInputError, NotFoundError
from alignfuse.models.base import CrossEncoder, DualEncoder, ImageTransform

from ._fs import close_inherited_lock
from .collection import Collection, CollectionWriter, ShaLookup, is_collection
from .options import IndexOptions
from .sources import Source, SourceItem, text_sha256
from .types import NewItem


@dataclass(frozen=True)
class BuildOptions:
    """Settings of one build/add run.

    ``commit_every``: commit a new version after at least this many added items (0 = only at the end).
    ``rerank_cache``: also store the cross-encoder's image tokens (needs ``cross_encoder``).
    ``merge_at_end``: merge the segments this run committed into one (O(items added), no re-encoding).
    ``draft``: let PIL decode JPEGs at reduced size (``Image.draft``) when they are much bigger than the
    model input. ``progress``: show a rich progress bar (items/s, ETA).
    """

    batch_size: int = 64
    num_workers: int = 0
    commit_every: int = 10_000
    index: IndexOptions = field(default_factory=IndexOptions)
    rerank_cache: bool = False
    progress: bool = True
    draft: bool = True
    merge_at_end: bool = True
    max_image_pixels: int = 64_000_000
    prefetch_factor: int = 2


@dataclass(frozen=True)
class BuildReport:
    """What a build/add run did."""

    collection: Path
    version: int
    added: int
    added_images: int
    added_texts: int
    skipped_existing: int
    failed: tuple[tuple[str, str], ...]
    seconds: float
    commits: int
    total_seen: int
    features_added: int = 0

    @property
    def items_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------------
# implementation

log = logging.getLogger(__name__)


@dataclass
class _Record:
    index: int
    kind: str
    status: str  # ok | skipped | failed
    sha256: str = ""
    reason: str = ""
    pixels: tuple[torch.Tensor, ...] = ()


@dataclass
class _Batch:
    records: list[_Record]
    pixels: tuple[torch.Tensor, ...]  # per transform: [n_ok_images, 3, H, W] in record order


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ItemDataset(Dataset[_Record]):
    """Reads, hashes, decodes and transforms one source item (in a DataLoader worker process)."""

    def __init__(
        self,
        items: Sequence[SourceItem],
        transforms: Sequence[ImageTransform],
        draft_size: int,
        lookup: ShaLookup,
        options: BuildOptions,
    ) -> None:
        self.items = list(items)
        self.transforms = list(transforms)
        self.draft_size = draft_size
        self.lookup = lookup
        self.draft = options.draft
        self.max_pixels = options.max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> _Record:
        it = self.items[i]
        if it.kind == "text":
            return _Record(i, "text", "ok", sha256=it.sha256 or text_sha256(it.text or ""))
        if it.path is None:
            return _Record(i, "image", "failed", reason="no path")
        try:
            data = it.path.read_bytes()
        except FileNotFoundError:
            return _Record(i, "image", "failed", reason="file not found")
        except OSError as exc:
            return _Record(i, "image", "failed", reason=f"unreadable: {exc.strerror or exc}")
        if not data:
            return _Record(i, "image", "failed", reason="empty file (0 bytes)")
        sha = _sha256_bytes(data)
        if self.lookup.known([sha]):
            return _Record(i, "image", "skipped", sha256=sha)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img: Image.Image = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > self.max_pixels:
                    return _Record(i, "image", "failed", sha, f"image too large ({w}x{h} pixels)")
                if self.draft and img.format == "JPEG":
                    img.draft("RGB", (self.draft_size, self.draft_size))
                img = img.convert("RGB")
        except UnidentifiedImageError:
            return _Record(i, "image", "failed", sha, "not an image (unrecognised format)")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return _Record(i, "image", "failed", sha, f"image too large: {exc}")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            msg = str(exc) or type(exc).__name__
            kind = "truncated image" if "truncat" in msg.lower() else "corrupt image"
            return _Record(i, "image", "failed", sha, f"{kind}: {msg}")
        try:
            pixels = tuple(t(img) for t in self.transforms)
        except Exception as exc:  # a transform failing on one odd image must not stop the build
            return _Record(i, "image", "failed", sha, f"transform failed: {exc}")
        return _Record(i, "image", "ok", sha, pixels=pixels)


def _collate(records: list[_Record]) -> _Batch:
    with_pixels = [r for r in records if r.pixels]
    stacked: tuple[torch.Tensor, ...] = ()
    if with_pixels:
        stacked = tuple(
            torch.stack([r.pixels[j] for r in with_pixels]) for j in range(len(with_pixels[0].pixels))
        )
    for r in records:
        r.pixels = ()
    return _Batch(records, stacked)


def _worker_init(lock_fd: int | None, _: int) -> None:
    torch.set_num_threads(1)
    close_inherited_lock(lock_fd)  # a SIGKILLed build must not leave its lock held by its workers


def _spans(items: Sequence[SourceItem], images_per_batch: int, max_items: int) -> list[list[int]]:
    """Contiguous spans of source indices holding ``images_per_batch`` images (captions ride along with
    their image), capped at ``max_items`` items. Deterministic: a resumed build sees the same spans."""
    spans: list[list[int]] = []
    cur: list[int] = []
    n_img = 0
    for i, it in enumerate(items):
        if it.kind == "image" and (n_img >= images_per_batch or len(cur) >= max_items):
            spans.append(cur)
            cur, n_img = [], 0
        elif it.kind == "text" and len(cur) >= max_items and n_img == 0:
            spans.append(cur)
            cur = []
        cur.append(i)
        n_img += it.kind == "image"
    if cur:
        spans.append(cur)
    return spans


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} items/s" if speed else "-- items/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def build_collection(
    path: str | Path,
    sources: Source | Sequence[Source],
    encoder: DualEncoder,
    *,
    options: BuildOptions | None = None,
    cross_encoder: CrossEncoder | None = None,
    must_exist: bool = False,
) -> BuildReport:
    """Create the collection at ``path`` (or extend/resume it when it exists) with the items of
    ``sources``, encoding only items whose content sha256 is not yet committed.

    ``must_exist=True`` (the ``add`` command) refuses to create one (NotFoundError). An existing collection
    built with another encoder raises EncoderMismatchError.
    """
    opts = options or BuildOptions()
    if opts.batch_size < 1 or opts.num_workers < 0 or opts.commit_every < 0:
        raise InvalidInputError("batch_size must be >= 1, num_workers >= 0, commit_every >= 0")
    if opts.rerank_cache and cross_encoder is None:
        raise InvalidInputError("--rerank-cache needs a reranker (--reranker SPEC)")
    t0 = time.perf_counter()
    root = Path(path)
    srcs: list[Source] = [sources] if isinstance(sources, Source) else list(sources)  # type: ignore[list-item]
    if not is_collection(root):
        if must_exist:
            raise NotFoundError(f"collection not found: {root} (create it with `alignfuse build`)")
        with contextlib.suppress(ConflictError):
            Collection.create(
                root,
                encoder.info,
                options=opts.index,
                reranker=cross_encoder.info if cross_encoder is not None and opts.rerank_cache else None,
            ).close()
    items: list[SourceItem] = []
    for s in srcs:
        items.extend(s.items())
    failed: list[tuple[str, str]] = []
    for s in srcs:
        failed.extend(s.problems)
    cross = cross_encoder if opts.rerank_cache else None
    with CollectionWriter(root, opts.index) as writer:
        writer.check_encoder(encoder.info)
        wanted_key = opts.index.index_key
        if wanted_key is not None and wanted_key.strip() != (writer.manifest.index_key or ""):
            raise InvalidInputError(
                f"--index-key: collection {root} uses index key {writer.manifest.index_key or 'auto'!r}; "
                f"change it with `alignfuse compact {root} --index-key {wanted_key}`"
            )
        if cross is not None and writer.manifest.reranker is not None:
            writer.manifest.reranker.check(cross.info, what="reranker", collection=str(root))
        return _run(root, items, failed, encoder, cross, writer, opts, t0)


def _run(
    root: Path,
    items: list[SourceItem],
    failed: list[tuple[str, str]],
    encoder: DualEncoder,
    cross: CrossEncoder | None,
    writer: CollectionWriter,
    opts: BuildOptions,
    t0: float,
) -> BuildReport:
    transforms: list[ImageTransform] = [encoder.image_transform]
    draft_size = encoder.info.preprocess.image_size
    if cross is not None:
        transforms.append(cross.image_transform)
        draft_size = max(draft_size, cross.info.preprocess.image_size)
    dataset = _ItemDataset(items, transforms, draft_size, writer.sha_lookup(), opts)
    spans = _spans(items, opts.batch_size, max_items=max(opts.batch_size * 8, 256))
    loader = DataLoader(
        dataset,
        batch_sampler=spans,
        num_workers=opts.num_workers,
        collate_fn=_collate,
        worker_init_fn=functools.partial(_worker_init, writer.lock_fd) if opts.num_workers > 0 else None,
        prefetch_factor=opts.prefetch_factor if opts.num_workers > 0 else None,
        persistent_workers=False,
    )
    start_version = writer.base_version
    added_images = added_texts = skipped = features_added = 0
    commits = 0
    since_commit = 0
    with _progress(opts.progress) as progress:
        task = progress.add_task(f"indexing {root.name}", total=len(items))
        for batch in loader:
            recs = batch.records
            for r in recs:
                if r.status == "failed":
                    uri = items[r.index].uri
                    failed.append((uri, r.reason))
                    log.warning("skipping %s: %s", uri, r.reason)
            skipped += sum(r.status == "skipped" for r in recs)
            ok = [r for r in recs if r.status == "ok"]
            known = writer.known_sha256([r.sha256 for r in ok])
            pix_row = {
                r.index: j
                for j, r in enumerate(r2 for r2 in recs if r2.status == "ok" and r2.kind == "image")
            }
            new_img: list[_Record] = []
            new_txt: list[_Record] = []
            seen: set[str] = set()
            for r in ok:
                if r.sha256 in known or r.sha256 in seen:
                    skipped += 1
                    continue
                seen.add(r.sha256)
                (new_img if r.kind == "image" else new_txt).append(r)
            uri_to_id: dict[str, int] = {}
            if new_img:
                rows = torch.as_tensor([pix_row[r.index] for r in new_img], dtype=torch.long)
                pixels = batch.pixels[0].index_select(0, rows)
                with torch.inference_mode():
                    vecs = encoder.encode_images(pixels)
                new_items = [_new_item(items[r.index], r.sha256) for r in new_img]
                ids = writer.add(new_items, vecs)
                uri_to_id.update({it.uri: int(i) for it, i in zip(new_items, ids.tolist(), strict=True)})
                added_images += len(new_img)
                if cross is not None:
                    with torch.inference_mode():
                        states = cross.image_states(batch.pixels[1].index_select(0, rows))
                    tokens = states.tokens.detach().to("cpu", torch.float16).numpy()
                    writer.put_features(ids, tokens, cross.info)
                    features_added += len(ids)
            if new_txt:
                links = [str(items[r.index].metadata.get("image_uri", "")) for r in new_txt]
                missing = sorted({u for u in links if u and u not in uri_to_id})
                if missing:
                    uri_to_id.update(writer.find_live_by_uri(missing, "image"))
                texts = [items[r.index].text or "" for r in new_txt]
                with torch.inference_mode():
                    tvecs = np.concatenate(
                        [encoder.encode_texts(texts[s : s + 256]) for s in range(0, len(texts), 256)]
                    )
                new_items = [
                    _new_item(items[r.index], r.sha256, uri_to_id.get(link))
                    for r, link in zip(new_txt, links, strict=True)
                ]
                writer.add(new_items, tvecs)
                added_texts += len(new_txt)
            since_commit += len(new_img) + len(new_txt)
            if opts.commit_every and since_commit >= opts.commit_every:
                writer.commit()
                commits += 1
                since_commit = 0
            progress.advance(task, len(recs))
        if writer.pending:
            writer.commit()
            commits += 1
    ours = [sg.id for sg in writer.manifest.segments if sg.version > start_version]
    if opts.merge_at_end and len(ours) > 1:
        writer.merge(ours)
    version = writer.base_version
    seconds = time.perf_counter() - t0
    report = BuildReport(
        collection=root,
        version=version,
        added=added_images + added_texts,
        added_images=added_images,
        added_texts=added_texts,
        skipped_existing=skipped,
        failed=tuple(failed),
        seconds=seconds,
        commits=commits,
        total_seen=len(items),
        features_added=features_added,
    )
    log.info(
        "%s: added %d (%d images, %d texts), skipped %d existing, %d failed, version %d, %.1fs",
        root,
        report.added,
        added_images,
        added_texts,
        skipped,
        len(failed),
        version,
        seconds,
    )
    return report


def _new_item(it: SourceItem, sha: str, image_item_id: int | None = None) -> NewItem:
    meta = dict(it.metadata)
    if image_item_id is not None:
        meta["image_item_id"] = image_item_id
    return NewItem(kind=it.kind, uri=it.uri, sha256=sha, text=it.text, metadata=meta)
