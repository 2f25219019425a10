"""``alignfuse build`` and ``alignfuse add``: one option set, declared once, and one build path (the local
streaming builder, or ``--engine ray``).

``COLLECTION`` is a path. Domain errors raised here (taxonomy of :mod:`alignfuse.errors`) become one line on
stderr and a non-zero exit code in :func:`alignfuse.service.cli.main`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from alignfuse.errors import InvalidInputError

from ._common import (
    EXIT_ITEMS_FAILED,
    PRECISION_HELP,
    DeviceOpt,
    check_collection,
    check_device,
    check_positive,
    check_runtime,
    console,
)

if TYPE_CHECKING:  # the index package (torch, faiss) is imported when a command runs, not at CLI start
    from alignfuse.index import BuildReport, IndexOptions, Source

log = logging.getLogger(__name__)

GiB = 1 << 30
_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127)}


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
            line = f"  {uri}: {reason}".translate(_CONTROL)  # a newline in a file name stays on its line
            console.print(line, soft_wrap=True, highlight=False, markup=False)
        if len(report.failed) > max_failed:
            console.print(f"  ... and {len(report.failed) - max_failed} more", highlight=False)
    if report.removed:
        console.print(f"removed {report.collection}: this first build committed nothing", style="bold yellow")


def _finish(report: BuildReport, allow_failures: bool) -> None:
    """Print the summary; exit with EXIT_ITEMS_FAILED when any item failed, unless ``allow_failures``."""
    _print_report(report)
    if report.failed and not allow_failures:
        typer.echo(
            f"{len(report.failed)} item(s) failed (listed above): exit code {EXIT_ITEMS_FAILED}; "
            "pass --allow-failures when failures are expected",
            err=True,
        )
        raise typer.Exit(EXIT_ITEMS_FAILED)


def _run_build(
    collection: Path,
    *,
    images: Path | None,
    captions: Path | None,
    karpathy: Path | None,
    image_root: Path | None,
    model: str,
    allow_outside_root: bool = False,
    index_key: str | None,
    batch_size: int,
    device: str,
    precision: str,
    workers: int,
    commit_every: int,
    runtime: str = "torch",
    rerank_cache: bool,
    reranker: str | None,
    memory_budget_gb: float,
    progress: bool,
    must_exist: bool,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int = 1,
    webdataset: Path | None = None,
) -> BuildReport:
    from alignfuse.index import BuildOptions, build_collection, open_source
    from alignfuse.index.builder import check_writable
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    check_positive("--batch-size", batch_size)
    check_positive("--workers", workers, 0)
    check_positive("--commit-every", commit_every, 0)
    if rerank_cache and not reranker:
        raise InvalidInputError("--rerank-cache needs --reranker SPEC")
    if reranker and not rerank_cache:
        raise InvalidInputError("--reranker is only used with --rerank-cache")
    _check_engine(engine, ray_address, ray_actors)
    dev = check_device(device)
    runtime = check_runtime(runtime)
    if engine == "ray" and runtime != "torch":
        raise InvalidInputError("--runtime: the ray engine's encoder actors run torch; use --runtime torch")
    if webdataset is not None:
        source = _webdataset_source(webdataset, engine, images or captions or karpathy or image_root)
    else:
        source = open_source(
            images=images,
            captions=captions,
            karpathy=karpathy,
            image_root=image_root,
            allow_outside_root=allow_outside_root,
        )
    check_writable(collection)  # a second writer fails here, before the models load
    options = BuildOptions(
        batch_size=batch_size,
        num_workers=workers,
        commit_every=commit_every,
        index=_index_options(index_key, memory_budget_gb),
        rerank_cache=rerank_cache,
        progress=progress,
    )
    encoder = create_dual_encoder(model, dev, precision, runtime=runtime)
    if engine == "ray":  # the encoder pass on a Ray cluster (index/ray_build.py); Ray is imported there
        from alignfuse.index.ray_build import RayOptions, ray_build_collection

        ray_opts = RayOptions(address=ray_address, actors=ray_actors)
        return ray_build_collection(
            collection,
            source,
            encoder,
            options=options,
            ray_options=ray_opts,
            device=dev,
            precision=precision,
            must_exist=must_exist,
        )
    cross = create_cross_encoder(reranker, dev, precision, runtime=runtime) if reranker else None
    return build_collection(
        collection, source, encoder, options=options, cross_encoder=cross, must_exist=must_exist
    )


def _webdataset_source(path: Path, engine: str, other: Path | None) -> Source:
    from alignfuse.index.webdataset import WebDatasetSource

    if other is not None:
        raise InvalidInputError("--webdataset: give it alone (not with --images, --captions, --karpathy)")
    if engine != "ray":
        raise InvalidInputError("--webdataset needs --engine ray")
    return WebDatasetSource(path)


def _check_engine(engine: str, ray_address: str | None, ray_actors: int) -> None:
    import importlib.util

    if engine not in ("local", "ray"):
        raise InvalidInputError(f"--engine: must be 'local' or 'ray', got {engine!r}")
    if engine == "local" and (ray_address is not None or ray_actors != 1):
        raise InvalidInputError("--ray-address and --ray-actors need --engine ray")
    check_positive("--ray-actors", ray_actors)
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise InvalidInputError("--engine ray needs Ray: pip install 'alignfuse[ray]'")


# -- options shared by build and add (declared once) -------------------------------------------------
ImagesOpt = Annotated[
    Path | None, typer.Option("--images", help="Folder of images (recursive, by extension).")
]
CaptionsOpt = Annotated[
    Path | None, typer.Option("--captions", help="Captions file: JSONL or CSV (image, caption).")
]
KarpathyOpt = Annotated[Path | None, typer.Option("--karpathy", help="Karpathy-split JSON (COCO/Flickr30K).")]
ImageRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--image-root",
        help="Folder that caption image paths are relative to and confined to (default: the file's folder).",
    ),
]
OutsideRootOpt = Annotated[
    bool,
    typer.Option(
        "--allow-outside-root",
        help="Also index files whose real path leaves --images / --image-root (.., absolute paths, symlinks).",
    ),
]
AllowFailuresOpt = Annotated[
    bool,
    typer.Option(
        "--allow-failures",
        help=f"Exit 0 even when some files or records failed (otherwise exit code {EXIT_ITEMS_FAILED}).",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
BuildRuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="torch (default), onnx (ONNX Runtime, CPU; graphs exported once and cached next to the weights) "
        "or auto. The collection's vectors then come from that runtime (fp32 ONNX matches torch to ~1e-6).",
    ),
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", help="DataLoader worker processes (0 = decode in-process).")
]
CommitEveryOpt = Annotated[int, typer.Option("--commit-every", help="Commit a version every N added items.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
EngineOpt = Annotated[
    str,
    typer.Option("--engine", help="local (this process) or ray (Ray cluster; pip install 'alignfuse[ray]')."),
]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="Ray cluster address (default: start a local one).")
]
RayActorsOpt = Annotated[int, typer.Option("--ray-actors", help="Encoder actors on the Ray cluster.")]
WebDatasetOpt = Annotated[
    Path | None, typer.Option("--webdataset", help="WebDataset .tar shard or folder of them (--engine ray).")
]


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
    runtime: BuildRuntimeOpt = "torch",
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
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 1,
    webdataset: WebDatasetOpt = None,
    allow_outside_root: OutsideRootOpt = False,
    allow_failures: AllowFailuresOpt = False,
) -> None:
    """Build a collection from images or captioned images (re-running resumes a killed build).

    Files and records that cannot be read are reported and skipped; the exit code is then 6 unless
    --allow-failures.
    """
    report = _run_build(
        collection,
        images=images,
        captions=captions,
        karpathy=karpathy,
        image_root=image_root,
        allow_outside_root=allow_outside_root,
        model=model,
        index_key=index_key,
        batch_size=batch_size,
        device=device,
        precision=precision,
        runtime=runtime,
        workers=workers,
        commit_every=commit_every,
        rerank_cache=rerank_cache,
        reranker=reranker,
        memory_budget_gb=memory_budget_gb,
        progress=progress,
        must_exist=False,
        engine=engine,
        ray_address=ray_address,
        ray_actors=ray_actors,
        webdataset=webdataset,
    )
    _finish(report, allow_failures)


def add_command(
    collection: Path = typer.Argument(..., help="Existing collection folder."),
    images: ImagesOpt = None,
    captions: CaptionsOpt = None,
    karpathy: KarpathyOpt = None,
    image_root: ImageRootOpt = None,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    runtime: BuildRuntimeOpt = "torch",
    workers: WorkersOpt = 2,
    commit_every: CommitEveryOpt = 10_000,
    progress: ProgressOpt = True,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 1,
    webdataset: WebDatasetOpt = None,
    allow_outside_root: OutsideRootOpt = False,
    allow_failures: AllowFailuresOpt = False,
) -> None:
    """Add items to an existing collection (model, index key and rerank cache taken from its manifest).

    Files and records that cannot be read are reported and skipped; the exit code is then 6 unless
    --allow-failures.
    """
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
        allow_outside_root=allow_outside_root,
        model=m.encoder.spec,
        index_key=None,
        batch_size=batch_size,
        device=device,
        precision=precision,
        runtime=runtime,
        workers=workers,
        commit_every=commit_every,
        rerank_cache=has_cache,
        reranker=m.features.reranker.spec if m.features is not None else None,
        memory_budget_gb=4.0,
        progress=progress,
        must_exist=True,
        engine=engine,
        ray_address=ray_address,
        ray_actors=ray_actors,
        webdataset=webdataset,
    )
    _finish(report, allow_failures)
