"""``alignfuse demo``: the built-in offline default, end to end.

Generates the held-out synthetic scenes (if absent) and builds two collections over them, one per pipeline:
``scenes`` (the shipped ALBEF's ITC side as dual encoder → its ITM head) and ``scenes-clip`` (the shipped CLIP
→ the same ALBEF ITM), both with a rerank cache of ALBEF's image tokens. Measures both truth-aware
(:mod:`.demo_report`): R@1/R@5, how often the rerank moved the first true image up or down, and suggested
queries where the rerank helps (written for the page). Then serves the page, where the pipeline is chosen.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from alignfuse.index import BuildReport
    from alignfuse.models.base import CrossEncoder, DualEncoder

log = logging.getLogger(__name__)

DEMO_MODEL = "alignfuse:scenes-albef"
CLIP_MODEL = "alignfuse:scenes-clip"
COLLECTION = "scenes"
CLIP_COLLECTION = "scenes-clip"


def _build(
    target: Path, karpathy: Path, scenes_dir: Path, dual: DualEncoder, cross: CrossEncoder
) -> BuildReport:
    """Build (or resume) one demo collection; one built by other weights (an upgrade of the shipped
    models, another --model) is derived data: moved aside, rebuilt, and only then deleted, so an
    interrupted rebuild loses nothing."""
    from alignfuse.errors import EncoderMismatchError
    from alignfuse.index import BuildOptions, build_collection, open_source

    def build() -> BuildReport:
        return build_collection(
            target,
            open_source(karpathy=karpathy, image_root=scenes_dir),
            dual,
            options=BuildOptions(rerank_cache=True, batch_size=128),
            cross_encoder=cross,
        )

    stale = target.parent / f".{target.name}.stale"
    try:
        return build()
    except EncoderMismatchError as exc:
        typer.echo(f"{exc.message}\nrebuilding the demo collection for {dual.info.id} ...", err=True)
        shutil.rmtree(stale, ignore_errors=True)
        target.rename(stale)
        report = build()
        shutil.rmtree(stale, ignore_errors=True)
        return report


def demo(
    data: Path = typer.Option(
        Path("demo-data"), "--data", help="Where the scenes and the collections are written."
    ),
    count: int = typer.Option(1000, "--count", min=10, help="Number of test scenes in the demo gallery."),
    seed: int = typer.Option(
        3, "--seed", help="Scene generator seed (3 = the held-out test split of the shipped models' cards)."
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the web page after building."),
    examples: int = typer.Option(
        5, "--examples", min=0, help="How many suggested queries to print per pipeline (0: measure nothing)."
    ),
    probe: int = typer.Option(
        80, "--probe", min=1, help="Test captions the printed R@1/R@5 are measured on."
    ),
    candidates: int = typer.Option(64, "--candidates", min=1, help="Candidates reranked per measured query."),
    model: str = typer.Option(
        DEMO_MODEL, "--model", help="ALBEF-family spec: the reranker, and the dual encoder of 'scenes'."
    ),
    clip_model: str = typer.Option(
        CLIP_MODEL,
        "--clip-model",
        help="Dual encoder of the second pipeline ('scenes-clip', reranked by --model); 'none' for one pipeline.",
    ),
) -> None:
    """Build the offline demo (synthetic scenes, shipped models, two pipelines) and serve it on
    http://HOST:PORT: 'scenes' (ALBEF ITC → ALBEF ITM) and 'scenes-clip' (CLIP → ALBEF ITM)."""
    from alignfuse.data.scenes import generate_scenes
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    from ..api import create_app
    from ..engine import SearchEngine
    from ..settings import ModelSettings, ServerSettings, Settings
    from .demo_report import Pipeline, measure, summary_lines

    scenes_dir = data / f"scenes-test-seed{seed}-n{count}"
    karpathy = scenes_dir / "scenes.json"
    if not karpathy.is_file():
        typer.echo(f"generating {count} test scenes in {scenes_dir} ...", err=True)
        generate_scenes(scenes_dir, seed=seed, count=count, split="test")
    collections = data / "collections"
    cross = create_cross_encoder(model)
    pipelines = [Pipeline(COLLECTION, model, model)]
    if clip_model.strip().lower() not in ("", "none", "off"):
        pipelines.append(Pipeline(CLIP_COLLECTION, clip_model, model))
    for p in pipelines:
        typer.echo(
            f"building collection {collections / p.collection} ({p.label}; resumes if interrupted) ...",
            err=True,
        )
        report = _build(collections / p.collection, karpathy, scenes_dir, create_dual_encoder(p.dual), cross)
        typer.echo(
            f"collection {p.collection} ready: {report.added} items added, {report.skipped_existing} already "
            f"there, {len(report.failed)} failed, {report.seconds:.1f}s",
            err=True,
        )
    # the served engine holds one dual encoder per collection encoder (ALBEF's ITC side and the CLIP)
    # and the one reranker; ALBEF → ALBEF is the default
    settings = Settings(
        collections=collections,
        models=ModelSettings(dual_encoder=model, reranker=model),
        server=ServerSettings(host=host, port=port),
    )
    if examples:
        engine = SearchEngine(settings)
        engine.load()
        try:
            reports = [
                measure(engine, p, karpathy, collections / p.collection, probe=probe, candidates=candidates)
                for p in pipelines
            ]
        finally:
            engine.close()
        for line in summary_lines(reports, examples):
            typer.echo(line)
    if not serve:
        return
    import uvicorn

    typer.echo(f"serving http://{host}:{port}  (Ctrl-C to stop)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command("demo")(demo)
