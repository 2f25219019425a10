"""``alignfuse demo``: the built-in offline default, end to end.

Generates the held-out synthetic scenes (if absent), builds a collection with the shipped ALBEF (dual encoder =
its ITC side, rerank cache of its image tokens), finds example queries where the ITM rerank changes the order,
prints them, and serves the web page.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import typer

log = logging.getLogger(__name__)

DEMO_MODEL = "alignfuse:scenes-albef"
COLLECTION = "scenes"


@dataclass(frozen=True)
class Example:
    query: str
    rank_itc: int | None  # rank of the true image by ITC alone among the candidates (None: not in the top-k)
    rank_itm: int | None  # its rank after the rerank


def _true_rank(hits: list, target_name: str, attr: str) -> int | None:
    for hit in hits:
        if Path(hit.uri).name == target_name:
            return int(getattr(hit, attr))
    return None


def find_examples(
    engine: object, karpathy: Path, *, probe: int = 80, k: int = 10
) -> tuple[list[Example], int, int, int]:
    """Run ``probe`` test captions with and without rerank; return examples where the rerank fixed the order,
    and how many probes the rerank improved / worsened (rank of the caption's own image)."""
    import json

    from ..types import SearchRequest

    entries = json.loads(karpathy.read_text())
    fixed: list[Example] = []
    better = worse = 0
    for entry in entries[:probe]:
        caption = entry["caption"][0] if isinstance(entry["caption"], list) else entry["caption"]
        name = Path(entry["image"]).name
        itc = engine.search_sync(SearchRequest(collection=COLLECTION, text=caption, k=k, rerank=False))  # type: ignore[attr-defined]
        itm = engine.search_sync(SearchRequest(collection=COLLECTION, text=caption, k=k, rerank=True))  # type: ignore[attr-defined]
        r_itc = _true_rank(list(itc.hits), name, "rank")
        r_itm = _true_rank(list(itm.hits), name, "rank")
        a = r_itc if r_itc is not None else k + 1
        b = r_itm if r_itm is not None else k + 1
        better += b < a
        worse += b > a
        if b == 1 and a > 1:
            fixed.append(Example(caption, r_itc, r_itm))
    return fixed, better, worse, min(probe, len(entries))


def demo(
    data: Path = typer.Option(
        Path("demo-data"), "--data", help="Where the scenes and the collection are written."
    ),
    count: int = typer.Option(1000, "--count", min=10, help="Number of test scenes in the demo gallery."),
    seed: int = typer.Option(
        3, "--seed", help="Scene generator seed (3 = the held-out test split of the shipped models' cards)."
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the web page after building."),
    examples: int = typer.Option(5, "--examples", min=0, help="How many example queries to print."),
    model: str = typer.Option(DEMO_MODEL, "--model", help="ALBEF-family spec serving both stages."),
) -> None:
    """Build the offline demo (synthetic scenes + shipped models) and serve it on http://HOST:PORT."""
    from alignfuse.data.scenes import generate_scenes
    from alignfuse.errors import EncoderMismatchError
    from alignfuse.index import BuildOptions, BuildReport, build_collection, open_source
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    from ..api import create_app
    from ..engine import SearchEngine
    from ..settings import ModelSettings, ServerSettings, Settings

    scenes_dir = data / f"scenes-test-seed{seed}-n{count}"
    karpathy = scenes_dir / "scenes.json"
    if not karpathy.is_file():
        typer.echo(f"generating {count} test scenes in {scenes_dir} ...", err=True)
        generate_scenes(scenes_dir, seed=seed, count=count, split="test")
    collections = data / "collections"
    typer.echo(
        f"building collection {collections / COLLECTION} with {model} (resumes if interrupted) ...",
        err=True,
    )
    dual = create_dual_encoder(model)
    cross = create_cross_encoder(model)
    target = collections / COLLECTION
    stale = collections / f".{COLLECTION}.stale"

    def build() -> BuildReport:
        return build_collection(
            target,
            open_source(karpathy=karpathy, image_root=scenes_dir),
            dual,
            options=BuildOptions(rerank_cache=True, batch_size=128),
            cross_encoder=cross,
        )

    try:
        report = build()
    except EncoderMismatchError as exc:
        # the demo collection is derived data: built by older shipped weights (or another --model), it is
        # moved aside, rebuilt, and only then deleted, so an interrupted rebuild loses nothing
        typer.echo(f"{exc.message}\nrebuilding the demo collection for {dual.info.id} ...", err=True)
        shutil.rmtree(stale, ignore_errors=True)
        target.rename(stale)
        report = build()
        shutil.rmtree(stale, ignore_errors=True)
    typer.echo(
        f"collection ready: {report.added} items added, {report.skipped_existing} already there, "
        f"{len(report.failed)} failed, {report.seconds:.1f}s",
        err=True,
    )
    settings = Settings(
        collections=collections,
        models=ModelSettings(dual_encoder=model, reranker=model),
        server=ServerSettings(host=host, port=port),
    )
    if examples:
        engine = SearchEngine(settings, dual_encoder=dual, cross_encoder=cross)
        engine.load()
        try:
            fixed, better, worse, probed = find_examples(engine, karpathy)
        finally:
            engine.close()
        typer.echo(
            f"\nOn {probed} test captions the ITM rerank moved the caption's own image up for {better} and down for "
            f"{worse}. Queries where the rerank puts the right image first (ITC had it lower):"
        )
        for ex in fixed[:examples]:
            before = f"#{ex.rank_itc}" if ex.rank_itc is not None else "not in top 10"
            typer.echo(f"  - {ex.query!r}: dual encoder {before} -> reranked #{ex.rank_itm}")
        typer.echo("Also try: 'two red circles', 'a blue star left of a green square', or upload an image.\n")
    if not serve:
        return
    import uvicorn

    typer.echo(f"serving http://{host}:{port}  (Ctrl-C to stop)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command("demo")(demo)
