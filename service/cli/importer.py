"""CLI: ``alignfuse import COLLECTION SHARDS`` — precomputed embeddings (clip-retrieval's layout, or the shards
``build --engine ray`` writes) into a collection, one committed segment per shard."""

from __future__ import annotations

from pathlib import Path

import typer

from alignfuse.errors import InvalidInputError

from ._common import DeviceOpt, check_device, console

GiB = 1 << 30


def import_command(
    collection: Path = typer.Argument(..., help="Collection folder (created if missing)."),
    shards: Path = typer.Argument(
        ..., help="Folder with img_emb/, metadata/ (and text_emb/): clip-retrieval's inference output."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Dual-encoder spec that made the embeddings (default: the folder's alignfuse.json).",
    ),
    index_key: str | None = typer.Option(
        None, "--index-key", help="FAISS factory string (default: automatic)."
    ),
    memory_budget_gb: float = typer.Option(
        4.0, "--memory-budget-gb", help="Memory budget for the index choice."
    ),
    renormalize: bool = typer.Option(
        False, "--renormalize", help="Normalise vectors that are not unit length instead of failing."
    ),
    merge: bool = typer.Option(
        True, "--merge/--no-merge", help="Merge the imported shards into one segment."
    ),
    device: DeviceOpt = "cpu",
) -> None:
    """Import embedding shards: each shard one committed segment; re-running imports only what is missing."""
    from alignfuse.index import IndexOptions
    from alignfuse.index.ann import validate_index_key
    from alignfuse.index.shards import ImportOptions, import_shards

    if memory_budget_gb <= 0:
        raise InvalidInputError(f"--memory-budget-gb: must be > 0, got {memory_budget_gb}")
    if index_key is not None:
        index_key = validate_index_key(index_key)
    info = None
    if model is not None:
        from alignfuse.models.registry import create_dual_encoder

        info = create_dual_encoder(model, check_device(device)).info
    options = ImportOptions(
        index=IndexOptions(index_key=index_key, memory_budget_bytes=int(memory_budget_gb * GiB)),
        merge_at_end=merge,
        renormalize=renormalize,
    )
    r = import_shards(collection, shards, encoder=info, options=options)
    console.print(
        f"[bold]{r.collection}[/] version {r.version}: imported {r.shards} shard(s), added {r.added:,} "
        f"({r.added_images:,} images, {r.added_texts:,} texts), skipped {r.skipped_existing:,} already "
        f"indexed, {r.seconds:.1f}s",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
