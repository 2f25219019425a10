"""CLI commands for collections: build, add, delete, info, search, compact, models.

``COLLECTION`` is a path. Domain errors raised here (taxonomy of :mod:`alignfuse.errors`) become one line on
stderr and a non-zero exit code in :func:`alignfuse.service.cli.main`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from alignfuse.errors import InvalidInputError

from ._common import DeviceOpt, check_collection, check_device, check_positive, console
from .search import search_command

if TYPE_CHECKING:  # the index package (torch, faiss) is imported when a command runs, not at CLI start
    from alignfuse.index import BuildReport, IndexOptions

log = logging.getLogger(__name__)

GiB = 1 << 30


# -- helpers ------------------------------------------------------------------------------------------
def _index_options(index_key: str | None, memory_budget_gb: float, mmap: bool = False) -> IndexOptions:
    from alignfuse.index import IndexOptions
    from alignfuse.index.ann import validate_index_key

    if memory_budget_gb <= 0:
        raise InvalidInputError(f"--memory-budget-gb: must be > 0, got {memory_budget_gb}")
    if index_key is not None:
        index_key = validate_index_key(index_key)
    return IndexOptions(index_key=index_key, memory_budget_bytes=int(memory_budget_gb * GiB), mmap=mmap)


def _print_report(report: BuildReport, max_failed: int = 20) -> None:
    console.print(
        f"[bold]{report.collection}[/] version {report.version}: added {report.added:,} "
        f"({report.added_images:,} images, {report.added_texts:,} texts), "
        f"skipped {report.skipped_existing:,} already indexed, {len(report.failed):,} failed, "
        f"{report.seconds:.1f}s ({report.items_per_second:,.1f} items/s), {report.commits} commits"
        + (f", {report.features_added:,} feature rows" if report.features_added else ""),
        soft_wrap=True,
    )
    if report.failed:
        console.print(f"failed items ({len(report.failed)}):", style="bold yellow")
        for uri, reason in report.failed[:max_failed]:
            console.print(f"  {uri}: {reason}", soft_wrap=True, highlight=False, markup=False)
        if len(report.failed) > max_failed:
            console.print(f"  ... and {len(report.failed) - max_failed} more", highlight=False)


def _run_build(
    collection: Path,
    *,
    images: Path | None,
    captions: Path | None,
    karpathy: Path | None,
    image_root: Path | None,
    model: str,
    index_key: str | None,
    batch_size: int,
    device: str,
    precision: str,
    workers: int,
    commit_every: int,
    rerank_cache: bool,
    reranker: str | None,
    memory_budget_gb: float,
    progress: bool,
    must_exist: bool,
) -> BuildReport:
    from alignfuse.index import BuildOptions, build_collection, open_source
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    check_positive("--batch-size", batch_size)
    check_positive("--workers", workers, 0)
    check_positive("--commit-every", commit_every, 0)
    if rerank_cache and not reranker:
        raise InvalidInputError("--rerank-cache needs --reranker SPEC")
    if reranker and not rerank_cache:
        raise InvalidInputError("--reranker is only used with --rerank-cache")
    dev = check_device(device)
    source = open_source(images=images, captions=captions, karpathy=karpathy, image_root=image_root)
    options = BuildOptions(
        batch_size=batch_size,
        num_workers=workers,
        commit_every=commit_every,
        index=_index_options(index_key, memory_budget_gb),
        rerank_cache=rerank_cache,
        progress=progress,
    )
    encoder = create_dual_encoder(model, dev, precision)
    cross = create_cross_encoder(reranker, dev, precision) if reranker else None
    return build_collection(
        collection, source, encoder, options=options, cross_encoder=cross, must_exist=must_exist
    )


# -- options shared by build and add (declared once) -------------------------------------------------
ImagesOpt = Annotated[
    Path | None, typer.Option("--images", help="Folder of images (recursive, by extension).")
]
CaptionsOpt = Annotated[
    Path | None, typer.Option("--captions", help="Captions file: JSONL or CSV (image, caption).")
]
KarpathyOpt = Annotated[Path | None, typer.Option("--karpathy", help="Karpathy-split JSON (COCO/Flickr30K).")]
ImageRootOpt = Annotated[
    Path | None, typer.Option("--image-root", help="Folder that image paths are relative to.")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16.")]
WorkersOpt = Annotated[
    int, typer.Option("--workers", help="DataLoader worker processes (0 = decode in-process).")
]
CommitEveryOpt = Annotated[int, typer.Option("--commit-every", help="Commit a version every N added items.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


# -- commands -----------------------------------------------------------------------------------------
def build_command(
    collection: Path = typer.Argument(
        ..., help="Collection folder (created if missing; resumed if it exists)."
    ),
    images: ImagesOpt = None,
    captions: CaptionsOpt = None,
    karpathy: KarpathyOpt = None,
    image_root: ImageRootOpt = None,
    model: str = typer.Option(
        ..., "--model", help="Dual-encoder spec, e.g. open_clip:ViT-B-32@laion2b_s34b_b79k."
    ),
    index_key: str | None = typer.Option(
        None, "--index-key", help="FAISS factory string (default: automatic)."
    ),
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    workers: WorkersOpt = 2,
    commit_every: CommitEveryOpt = 10_000,
    rerank_cache: bool = typer.Option(
        False, "--rerank-cache", help="Also cache the reranker's image tokens."
    ),
    reranker: str | None = typer.Option(None, "--reranker", help="Cross-encoder spec for --rerank-cache."),
    memory_budget_gb: float = typer.Option(
        4.0, "--memory-budget-gb", help="Memory budget for the index choice."
    ),
    progress: ProgressOpt = True,
) -> None:
    """Build a collection from images or captioned images (re-running resumes a killed build)."""
    report = _run_build(
        collection,
        images=images,
        captions=captions,
        karpathy=karpathy,
        image_root=image_root,
        model=model,
        index_key=index_key,
        batch_size=batch_size,
        device=device,
        precision=precision,
        workers=workers,
        commit_every=commit_every,
        rerank_cache=rerank_cache,
        reranker=reranker,
        memory_budget_gb=memory_budget_gb,
        progress=progress,
        must_exist=False,
    )
    _print_report(report)


def add_command(
    collection: Path = typer.Argument(..., help="Existing collection folder."),
    images: ImagesOpt = None,
    captions: CaptionsOpt = None,
    karpathy: KarpathyOpt = None,
    image_root: ImageRootOpt = None,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    workers: WorkersOpt = 2,
    commit_every: CommitEveryOpt = 10_000,
    progress: ProgressOpt = True,
) -> None:
    """Add items to an existing collection (model, index key and rerank cache taken from its manifest)."""
    from alignfuse.index import Collection

    check_collection(collection)
    with Collection.open(collection) as c:
        m = c.manifest
    has_cache = m.features is not None
    report = _run_build(
        collection,
        images=images,
        captions=captions,
        karpathy=karpathy,
        image_root=image_root,
        model=m.encoder.spec,
        index_key=None,
        batch_size=batch_size,
        device=device,
        precision=precision,
        workers=workers,
        commit_every=commit_every,
        rerank_cache=has_cache,
        reranker=m.features.reranker.spec if m.features is not None else None,
        memory_budget_gb=4.0,
        progress=progress,
        must_exist=True,
    )
    _print_report(report)


def delete_command(
    collection: Path = typer.Argument(..., help="Collection folder."),
    ids: list[int] = typer.Argument(..., help="Item ids to delete."),
) -> None:
    """Delete items (tombstones; dropped from disk at the next compaction)."""
    from alignfuse.index import Collection

    check_collection(collection)
    with Collection.open(collection) as c:
        version = c.delete(ids)
    console.print(f"deleted {len(set(ids))} item(s) from {collection}; now at version {version}")


def info_command(
    collection: Path = typer.Argument(..., help="Collection folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Manifest summary, counts, versions and segments of a collection."""
    from alignfuse.index import Collection

    check_collection(collection)
    with Collection.open(collection) as c:
        m = c.manifest
        if as_json:
            typer.echo(json.dumps(m.to_json(), indent=2))
            return
        versions = sorted(p.stem for p in (collection / "versions").glob("*.json"))
        pre = m.encoder.preprocess
        console.print(
            f"[bold]{collection}[/]  version {m.version} ({len(versions)} committed versions stored)"
        )
        console.print(
            f"dual encoder: {m.encoder.spec}  weights sha256 {m.encoder.weights_sha256[:16]}  dim {m.dim}"
        )
        if pre is not None:
            console.print(
                f"preprocess: {pre.image_size}px, {pre.resize_mode}, crop={pre.center_crop}, {pre.interpolation}"
            )
        console.print(f"reranker: {m.reranker.spec if m.reranker else '-'}")
        console.print(f"index: key {m.index_key or 'auto'}, metric {m.metric} (L2-normalised vectors)")
        console.print(
            f"items: {m.count('image'):,} images, {m.count('text'):,} texts live; {m.count('deleted'):,} deleted; "
            f"{m.tombstone_count:,} tombstones pending compaction"
        )
        if m.features is not None:
            console.print(
                f"feature cache: {m.features.count:,} rows of {m.features.token_shape} fp16 "
                f"({m.features.reranker.spec}), {len(m.features.chunks)} chunks"
            )
        table = Table(title=f"segments ({len(m.segments)})")
        for col in ("segment", "version", "images", "image index", "texts", "text index"):
            table.add_column(col)
        for s in m.segments:
            ip, tp = s.part("image"), s.part("text")
            table.add_row(
                s.id,
                str(s.version),
                f"{ip.count:,}" if ip else "0",
                ip.index_key if ip else "-",
                f"{tp.count:,}" if tp else "0",
                tp.index_key if tp else "-",
            )
        console.print(table)


def compact_command(
    collection: Path = typer.Argument(..., help="Collection folder."),
    index_key: str | None = typer.Option(
        None, "--index-key", help="Re-derive the indexes with this FAISS key."
    ),
) -> None:
    """Merge segments, drop tombstones, re-derive FAISS indexes from the stored embeddings."""
    from alignfuse.index import Collection
    from alignfuse.index.ann import validate_index_key

    check_collection(collection)
    with Collection.open(collection) as c:
        if index_key is not None:
            index_key = validate_index_key(index_key, c.dim)
        before = len(c.manifest.segments)
        version = c.compact(index_key)
        m = c.manifest
    keys = sorted({p.index_key for s in m.segments for _, p in s.parts})
    console.print(
        f"compacted {collection}: {before} segment(s) -> {len(m.segments)}, version {version}, "
        f"index {', '.join(keys) or '-'}"
    )


def models_command() -> None:
    """Known model specs, what each is, and whether its weights are cached locally."""
    from alignfuse.models.registry import list_models

    table = Table(title="models")
    for col in ("spec", "kind", "cached", "description"):
        table.add_column(col)
    for e in list_models():
        cached = "-" if e.cached is None else ("yes" if e.cached else "no")
        table.add_row(e.spec, e.kind, cached, e.description)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("build")(build_command)
    app.command("add")(add_command)
    app.command("delete")(delete_command)
    app.command("info")(info_command)
    app.command("search")(search_command)  # from .search: listed among the collection commands
    app.command("compact")(compact_command)
    app.command("models")(models_command)
