"""CLI commands for collections: delete, info, compact, models; build/add (from .build) and search (from .search)
registered here so ``--help`` lists them together.

``COLLECTION`` is a path. Domain errors raised here (taxonomy of :mod:`alignfuse.errors`) become one line on
stderr and a non-zero exit code in :func:`alignfuse.service.cli.main`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ._common import (
    check_collection,
    console,
)
from .build import add_command, build_command
from .search import search_command

if TYPE_CHECKING:  # the index package (torch, faiss) is imported when a command runs, not at CLI start
    pass

log = logging.getLogger(__name__)


def delete_command(
    collection: Path = typer.Argument(..., help="Collection folder."),
    ids: list[int] = typer.Argument(..., help="Item ids to delete."),
) -> None:
    """Delete items (tombstones; dropped from disk at the next compaction).

    Idempotent: ids already deleted are named in a warning (exit 0); an id that never existed exits 3.
    """
    from alignfuse.errors import NotFoundError
    from alignfuse.index import Collection

    check_collection(collection)
    with Collection.open(collection) as c:
        wanted = sorted(set(ids))
        states: dict[int, str] = {}
        for i in wanted:
            with contextlib.suppress(NotFoundError):
                states[i] = c.get(i).state
        unknown = [i for i in wanted if i not in states]
        if unknown:
            raise NotFoundError(f"no items {unknown[:10]} in collection {collection}")
        gone = [i for i in wanted if states[i] == "deleted"]
        live = [i for i in wanted if states[i] != "deleted"]
        if gone:
            typer.echo(f"warning: already deleted, nothing to do for them: {gone[:20]}", err=True)
        version = c.delete(live) if live else c.version
    console.print(f"deleted {len(live)} item(s) from {collection}; now at version {version}")


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
