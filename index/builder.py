"""Streaming builder: sources → (DataLoader workers: read, hash, decode, transform) → batched encoding →
segments committed every ``commit_every`` items. A killed build resumes: items whose content sha256 is
already committed are skipped before decoding/encoding.

Images are decoded by the one decoder every path uses (:func:`alignfuse.index.images.decode_image`: pixel
limit before decoding, EXIF orientation). A file that fails is reported and skipped with its captions. A
first build that fails (an exception, or nothing committed while items failed) removes the collection it
created; a killed one leaves what it committed, to be resumed. Worker processes die with the build
(``PR_SET_PDEATHSIG`` on Linux, and a parent-pid check)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
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
from torch.utils.data import DataLoader

from alignfuse.errors import AlignfuseError, ConflictError, InvalidInputError, NotFoundError
from alignfuse.models.base import CrossEncoder, DualEncoder, ImageTransform

from ._fs import WriterLock, rmtree_quiet
from ._loading import _collate, _ItemDataset, _Record, _spans, _worker_init
from .collection import Collection, CollectionWriter, is_collection
from .images import DEFAULT_MAX_PIXELS
from .manifest import Manifest
from .options import IndexOptions
from .segments import LOCK_FILE, MANIFEST
from .sources import Source, SourceItem
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
    max_image_pixels: int = DEFAULT_MAX_PIXELS
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
    removed: bool = False  # a first build that committed nothing while items failed: its collection removed

    @property
    def items_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------------
# implementation

log = logging.getLogger(__name__)


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
    if opts.rerank_cache and cross_encoder is not None and not cross_encoder.info.image_states_cacheable:
        raise InvalidInputError(
            f"--rerank-cache: {cross_encoder.info.spec} has no image states to cache (single-stream: every pair "
            "is a full pass from the pixels); build without --rerank-cache, it reranks from the image files"
        )
    t0 = time.perf_counter()
    root = Path(path)
    srcs: list[Source] = [sources] if isinstance(sources, Source) else list(sources)  # type: ignore[list-item]
    if must_exist and not is_collection(root):
        raise NotFoundError(f"collection not found: {root} (create it with `alignfuse build`)")
    items: list[SourceItem] = []
    for s in srcs:  # parsed before anything is created: a source that raises leaves nothing behind
        items.extend(s.items())
    failed: list[tuple[str, str]] = []
    for s in srcs:
        failed.extend(s.problems)
    existed = root.exists()
    created = False
    if not is_collection(root):
        try:
            Collection.create(
                root,
                encoder.info,
                options=opts.index,
                reranker=cross_encoder.info if cross_encoder is not None and opts.rerank_cache else None,
            ).close()
            created = True
        except ConflictError:
            if not is_collection(root):  # not a concurrent creation: a file, a folder of other things
                raise
    cross = cross_encoder if opts.rerank_cache else None
    try:
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
            report = _run(root, items, failed, encoder, cross, writer, opts, t0)
    except BaseException:
        if created:
            _remove_if_uncommitted(root, keep_folder=existed)
        raise
    if (
        created
        and report.version == 0
        and report.failed
        and _remove_if_uncommitted(root, keep_folder=existed)
    ):
        report = replace(report, removed=True)
    return report


def check_writable(path: str | Path) -> None:
    """Fail fast, before any expensive work, when another writer holds the collection at ``path`` (the
    lock's ConflictError names its pid and what to do). Nothing to check when no collection is there yet."""
    root = Path(path)
    if is_collection(root):
        WriterLock(root / LOCK_FILE).acquire().release()


def _remove_if_uncommitted(root: Path, *, keep_folder: bool) -> bool:
    """Remove the collection this process created at ``root`` if it is still at version 0 and nobody else
    writes it (a killed build leaves its commits: it is never here). True when removed."""
    try:
        lock = WriterLock(root / LOCK_FILE).acquire()
    except (ConflictError, OSError):
        return False
    try:
        if Manifest.load(root / MANIFEST).version != 0:
            return False
        if keep_folder:  # the folder was the user's (empty: creation refuses strangers): empty it again
            for p in root.iterdir():
                if p.is_dir() and not p.is_symlink():
                    rmtree_quiet(p)
                else:
                    p.unlink(missing_ok=True)
        else:
            rmtree_quiet(root)
        log.warning("removed the collection %s this build created: nothing was committed", root)
        return True
    except (AlignfuseError, OSError) as exc:
        log.warning("could not remove the uncommitted collection %s: %s", root, exc)
        return False
    finally:
        lock.release()


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
        worker_init_fn=(
            functools.partial(_worker_init, writer.lock_fd, os.getpid()) if opts.num_workers > 0 else None
        ),
        prefetch_factor=opts.prefetch_factor if opts.num_workers > 0 else None,
        persistent_workers=False,
    )
    start_version = writer.base_version
    failed_images: dict[str, int] = {}  # uri of an image that failed -> its entry in ``failed``
    dropped: Counter[str] = Counter()  # uri of an image that failed -> captions skipped with it
    added_images = added_texts = skipped = features_added = 0
    commits = 0
    since_commit = 0
    with _progress(opts.progress) as progress:
        task = progress.add_task(f"indexing {root.name}", total=len(items))
        for batch in loader:
            recs = batch.records
            for r in recs:
                it = items[r.index]
                if r.status == "failed":
                    failed_images[it.uri] = len(failed)
                    failed.append((it.name, r.reason))
                    log.warning("skipping %s: %s", it.name, r.reason)
                elif it.kind == "text" and it.metadata.get("image_uri") in failed_images:
                    r.status = "failed"  # a caption goes with its image
                    dropped[str(it.metadata["image_uri"])] += 1
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
    for uri, n in dropped.items():
        name, reason = failed[failed_images[uri]]
        failed[failed_images[uri]] = (name, f"{reason} (skipped with {n} caption{'s' if n > 1 else ''})")
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
