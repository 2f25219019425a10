"""CLI command ``alignfuse eval``: ALBEF-protocol retrieval evaluation of a collection's models on a
Karpathy-style test split (see ``docs/evaluation.md`` and :mod:`alignfuse.evaluation`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from alignfuse.data.scenes import caption_matches
from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.evaluation import DEFAULT_MAX_ALL_PAIRS, MODES, EvalReport, evaluate
from alignfuse.models.base import FUSIONS, PRECISION_CHOICES, default_fusion_for
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

from ._common import PRECISION_HELP, check_device, check_runtime

log = logging.getLogger(__name__)


def _parse_modes(modes: str | None, have_reranker: bool) -> tuple[str, ...]:
    if modes is None:
        return ("dual", "rerank") if have_reranker else ("dual",)
    parts = [m.strip() for m in modes.split(",") if m.strip()]
    if not parts:
        raise InvalidInputError(f"--modes is empty; choose from {', '.join(MODES)}")
    for m in parts:
        if m not in MODES:
            raise InvalidInputError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    return tuple(dict.fromkeys(parts))


def _recall_table(title: str) -> Table:
    table = Table(title=title)
    table.add_column("mode", no_wrap=True)
    for col in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean"):
        table.add_column(col, justify="right", no_wrap=True)
    return table


def _tables(report: EvalReport) -> tuple[Table, ...]:
    """Recall table (percent, ALBEF's protocol), the truth-aware recall table when the split lists its drawn
    objects, and a table of hard-negative group accuracy and cost, one row per mode."""
    m = report.meta
    title = (
        f"{Path(m.karpathy_file).name}: {m.n_images} images, {m.n_texts} texts, k_test={m.k_test}, "
        f"fusion={m.fusion}"
    )
    recall = _recall_table(title)
    truthful = _recall_table("truth-aware recall")
    truthful.caption = (
        "a retrieved image or caption counts when the caption is true of the image (judged from its drawn "
        "objects); the table above is ALBEF's protocol (annotated pairs only)"
    )
    cost = Table()
    cost.add_column("mode", no_wrap=True)
    has_group = any(r.group is not None for r in report.results)
    if has_group:
        cost.add_column("group t2i (chance)", justify="right")
        cost.add_column("group i2t (chance)", justify="right")
    for col in ("encoder passes", "pair evals", "seconds"):
        cost.add_column(col, justify="right")
    for r in report.results:
        rec = r.recall
        vals = (rec.tr_r1, rec.tr_r5, rec.tr_r10, rec.ir_r1, rec.ir_r5, rec.ir_r10, rec.r_mean)
        recall.add_row(r.mode, *(f"{v:.2f}" for v in vals))
        if r.truth_recall is not None:
            tr = r.truth_recall
            true_vals = (tr.tr_r1, tr.tr_r5, tr.tr_r10, tr.ir_r1, tr.ir_r5, tr.ir_r10, tr.r_mean)
            truthful.add_row(r.mode, *(f"{v:.2f}" for v in true_vals))
        row = [r.mode]
        if has_group:
            g = r.group
            row += (
                [f"{g.t2i:.3f} ({g.t2i_chance:.3f})", f"{g.i2t:.3f} ({g.i2t_chance:.3f})"]
                if g
                else ["-", "-"]
            )
        row += [f"{r.encoder_passes:,}", f"{r.pair_evals:,}", f"{r.seconds:.2f}"]
        cost.add_row(*row)
    cost.caption = (
        f"dual encoder {m.dual_encoder}; reranker {m.cross_encoder or '-'}; embeddings: {m.embeddings} "
        f"({m.encoded_now} encoded now)"
    )
    if any(r.truth_recall is not None for r in report.results):
        return recall, truthful, cost
    return recall, cost


def eval_command(
    collection: Path = typer.Argument(..., help="Collection folder; its manifest names the dual encoder."),
    karpathy: Path = typer.Option(
        ..., "--karpathy", help="Karpathy-style test split JSON (coco_test.json, ...)."
    ),
    image_root: Path | None = typer.Option(
        None,
        "--image-root",
        help="Folder the JSON's image paths are relative to (default: the JSON's folder).",
    ),
    modes: str | None = typer.Option(
        None,
        "--modes",
        help="Comma-separated: dual, rerank, all_pairs (default: dual,rerank; dual without reranker).",
    ),
    k_test: int = typer.Option(
        256, "--k-test", help="Rerank candidates per query (ALBEF: 256 COCO, 128 Flickr)."
    ),
    reranker: str | None = typer.Option(
        None, "--reranker", help="Cross-encoder spec (default: the reranker recorded in the manifest)."
    ),
    fusion: str | None = typer.Option(
        None,
        "--fusion",
        help="itm (ALBEF: ITM logit), itm+itc (BLIP: logit + cosine) or itm+itc_logit (logit + cosine x the "
        "dual encoder's logit scale); default: the reranker's own, as the service uses it (ALBEF checkpoints: itm).",
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    runtime: str = typer.Option(
        "torch",
        "--runtime",
        help="torch, onnx (ONNX Runtime, CPU) or auto: what runs the dual encoder and the reranker, e.g. "
        "--runtime onnx --precision int8 to check int8's recall against fp32's.",
    ),
    batch_size: int = typer.Option(
        64, "--batch-size", help="Images/texts per encoder forward, pairs per ITM forward."
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Evaluate only the first N images (and their captions)."
    ),
    max_all_pairs: int = typer.Option(
        DEFAULT_MAX_ALL_PAIRS, "--max-all-pairs", help="Refuse all_pairs above this many (image, text) pairs."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by mode (+ meta)."),
    pointing: bool = typer.Option(
        False,
        "--pointing",
        help="Instead of retrieval: the pointing game of the reranker's grounding heatmaps (the split's images "
        "must list their objects' positions, as the built-in scenes do).",
    ),
    pointing_layer: list[int] | None = typer.Option(
        None, "--pointing-layer", help="Fusion layer(s) to explain (repeatable; default: the reranker's)."
    ),
) -> None:
    """Retrieval recall (TR/IR R@1/5/10, r_mean) with ALBEF's protocol: dual encoder, rerank, all pairs."""
    if pointing:
        _pointing(
            collection, karpathy, image_root, reranker, device, precision, limit, pointing_layer, as_json
        )
        return
    if k_test < 1:
        raise InvalidInputError(f"--k-test must be >= 1, got {k_test}")
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {limit}")
    if max_all_pairs < 1:
        raise InvalidInputError(f"--max-all-pairs must be >= 1, got {max_all_pairs}")
    if fusion is not None and fusion not in FUSIONS:
        raise InvalidInputError(f"--fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if precision not in PRECISION_CHOICES:
        raise InvalidInputError(
            f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}"
        )
    if not karpathy.is_file():
        raise NotFoundError(f"--karpathy: file not found: {karpathy}")
    if image_root is not None and not image_root.is_dir():
        raise NotFoundError(f"--image-root: folder not found: {image_root}")
    if modes is not None:
        _parse_modes(modes, True)  # report a bad --modes before loading anything

    dev = check_device(device)
    runtime = check_runtime(runtime)

    from alignfuse.index.collection import Collection, is_collection

    if not is_collection(collection):
        raise NotFoundError(f"COLLECTION: no collection at {collection}")
    with Collection.open(collection) as coll:
        manifest = coll.manifest
        reranker_spec = reranker or (manifest.reranker.spec if manifest.reranker is not None else None)
        mode_list = _parse_modes(modes, reranker_spec is not None)
        if reranker_spec is None and any(m != "dual" for m in mode_list):
            raise InvalidInputError(
                "--reranker: modes rerank/all_pairs need a cross-encoder and the collection records none"
            )
        dual = create_dual_encoder(manifest.encoder.spec, device=dev, precision=precision, runtime=runtime)
        if not manifest.encoder.matches(dual.info):
            log.warning(
                "%s now has weights %s, the collection was built with %s: re-encoding the split",
                manifest.encoder.spec,
                dual.info.weights_sha256[:12],
                manifest.encoder.weights_sha256[:12],
            )
        cross = None
        if reranker_spec is not None and any(m != "dual" for m in mode_list):
            cross = create_cross_encoder(reranker_spec, device=dev, precision=precision, runtime=runtime)
        # the stored vectors and image tokens came from torch at the build's precision: another runtime or
        # precision is evaluated on its own outputs (the split re-encoded), so its recall is its own
        own_outputs = runtime != "torch" or precision != "fp32"
        if own_outputs:
            log.info("--runtime %s --precision %s: re-encoding the split", runtime, precision)
        report = evaluate(
            None if own_outputs else coll,
            karpathy,
            image_root,
            dual,
            cross,
            mode_list,
            k_test,
            batch_size,
            fusion=fusion
            or default_fusion_for(
                cross.info.default_fusion if cross is not None else "itm", dual.info.itc_logit_scale
            ),
            limit=limit,
            max_all_pairs=max_all_pairs,
            # used only when every image of the split lists its drawn objects, as the built-in scenes do
            truth=caption_matches,
        )
    if as_json:
        typer.echo(json.dumps(report.to_json()))
    else:
        console = Console()
        for table in _tables(report):
            console.print(table)


def _pointing(
    collection: Path,
    karpathy: Path,
    image_root: Path | None,
    reranker: str | None,
    device: str,
    precision: str,
    limit: int | None,
    layers: list[int] | None,
    as_json: bool,
) -> None:
    """``eval --pointing``: pointing-game accuracy of the reranker's grounding vs the area-chance baseline."""
    from alignfuse.evaluation import pointing_cases, pointing_game
    from alignfuse.index.collection import Collection, is_collection
    from alignfuse.models.base import GroundingModel

    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {limit}")
    if not karpathy.is_file():
        raise NotFoundError(f"--karpathy: file not found: {karpathy}")
    spec = reranker
    if spec is None:
        if not is_collection(collection):
            raise NotFoundError(f"COLLECTION: no collection at {collection}")
        with Collection.open(collection) as coll:
            spec = coll.manifest.reranker.spec if coll.manifest.reranker is not None else None
    if spec is None:
        raise InvalidInputError("--pointing needs a reranker: pass --reranker SPEC")
    cross = create_cross_encoder(spec, device=check_device(device), precision=precision)
    if not isinstance(cross, GroundingModel):
        raise InvalidInputError(f"--pointing: reranker {spec} has no grounding (ALBEF and BLIP rerankers do)")
    cases = pointing_cases(karpathy, image_root)
    if limit is not None:
        images = list(dict.fromkeys(c.image for c in cases))[:limit]
        keep = set(images)
        cases = [c for c in cases if c.image in keep]
    wanted: list[int | None] = list(layers) if layers else [None]
    results = [pointing_game(cross, cross.image_transform, cases, layer=layer) for layer in wanted]
    if as_json:
        typer.echo(json.dumps({"reranker": spec, "pointing": [r.to_json() for r in results]}))
        return
    table = Table(title=f"pointing game: {Path(karpathy).name}, reranker {spec}")
    for col in ("layer", "cases", "accuracy", "area chance", "centre", "empty", "seconds"):
        table.add_column(col, justify="right")
    for r in results:
        cells = (r.layer, f"{r.cases:,}", f"{r.accuracy:.3f}", f"{r.chance:.3f}", f"{r.centre:.3f}", r.empty)
        table.add_row(*(str(x) for x in cells), f"{r.seconds:.1f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("eval")(eval_command)
