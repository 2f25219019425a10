"""``alignfuse search``: one query through the engine (both stages, or the dual encoder alone with
``--no-rerank``), printed as a table."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table

from alignfuse.errors import InvalidInputError, NotFoundError

from ._common import MODALITIES, DeviceOpt, check_collection, check_device, check_positive, console

log = logging.getLogger(__name__)


def search_command(
    collection: Path = typer.Argument(..., help="Collection folder."),
    text: str | None = typer.Option(None, "--text", help="Query text."),
    image: Path | None = typer.Option(None, "--image", help="Query image file."),
    k: int = typer.Option(10, "-k", "--k", help="Number of results."),
    target: str | None = typer.Option(
        None,
        "--target",
        help="Search image or text items (default: the other modality, if the collection has any).",
    ),
    modality: str | None = typer.Option(
        None, "--modality", hidden=True, help="Deprecated alias of --target."
    ),
    device: DeviceOpt = "cpu",
    rerank: bool | None = typer.Option(
        None,
        "--rerank/--no-rerank",
        help="Two-stage search: rerank the top candidates with the cross-encoder (default: when one is "
        "known and the search is cross-modal).",
    ),
    reranker: str | None = typer.Option(
        None,
        "--reranker",
        help="Cross-encoder spec (default: the one recorded in the collection's manifest).",
    ),
    candidates: int = typer.Option(128, "--candidates", help="Dual-encoder candidates to rerank."),
) -> None:
    """Search a collection: dual encoder + FAISS, then (when a reranker is known) the cross-encoder rerank.

    Both modes run in process through the same engine the server uses."""
    from alignfuse.index import Collection

    from ..engine import SearchEngine
    from ..settings import LimitSettings, ModelSettings, Settings
    from ..types import SearchRequest

    if (text is None) == (image is None):
        raise InvalidInputError("give exactly one of --text or --image")
    if text is not None and not text.strip():
        raise InvalidInputError("--text: empty query")
    check_positive("-k", k)
    option = "--target"
    if modality is not None:
        if target is not None and target != modality:
            raise InvalidInputError(f"--target {target} and --modality {modality} disagree")
        target, option = modality, "--modality"
    if target is not None and target not in MODALITIES:
        raise InvalidInputError(f"{option}: must be image or text, got {target!r}")
    if option == "--modality":  # warned only once the value is known good: an error stays one line
        typer.echo("warning: --modality is deprecated; use --target", err=True)
    if image is not None and not image.is_file():
        raise NotFoundError(f"--image: file not found: {image}")
    check_collection(collection)
    dev = check_device(device)
    check_positive("--candidates", candidates)
    with Collection.open(collection) as c:
        m = c.manifest
    reranker_spec = reranker or (m.reranker.spec if m.reranker is not None else None)
    if rerank and reranker_spec is None:
        raise InvalidInputError("--rerank: no reranker recorded in the collection; pass --reranker SPEC")
    query = "text" if text is not None else "image"
    if target is None:  # the other modality when the collection has items of it, else the query's own
        other = "image" if query == "text" else "text"
        target = other if m.count(other) > 0 else query
    # the cross-encoder is loaded only when it can run: asked for, or by default on a cross-modal search
    use_reranker = reranker_spec is not None and (rerank or (rerank is None and target != query))
    settings = Settings(
        collections=collection.resolve().parent,
        models=ModelSettings(
            dual_encoder=m.encoder.spec,
            reranker=reranker_spec if use_reranker else "none",
            device=dev,
            warmup=False,
        ),
        limits=LimitSettings(
            max_k=max(k, 100),
            max_candidates=max(candidates, 512),
            max_upload_bytes=max(LimitSettings().max_upload_bytes, image.stat().st_size if image else 0),
        ),
    )
    engine = SearchEngine(settings)
    engine.load()
    try:
        resp = engine.search_sync(
            SearchRequest(
                collection=collection.resolve().name,
                text=text,
                image=image.read_bytes() if image is not None else None,
                target=target,  # type: ignore[arg-type]
                k=k,
                candidates=max(candidates, k),
                rerank=rerank,
            )
        )
    finally:
        engine.close()
    t = resp.timings
    reranked = f", {resp.pairs_scored} pairs reranked" if resp.reranked else ""
    table = Table(
        title=f"{collection} (version {resp.version}): top {k} {resp.target} items{reranked}; "
        f"encode {t.encode:.0f} ms, ann {t.ann:.0f} ms"
        + (f", rerank {t.rerank:.0f} ms" if resp.reranked else "")
    )
    for col in ("rank", "was", "id", "itm p", "itc", "uri / caption"):
        table.add_column(col, justify="left" if col == "uri / caption" else "right", overflow="fold")
    for h in resp.hits:
        label = h.uri if h.kind == "image" else (h.caption or "")
        if h.kind == "image" and h.caption:
            label += f"\n[dim]{h.caption}[/]"
        prob = "-" if h.itm_prob is None else f"{h.itm_prob:.3f}"
        table.add_row(str(h.rank), str(h.rank_itc), str(h.id), prob, f"{h.itc:.4f}", label)
    console.print(table)
