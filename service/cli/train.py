"""CLI commands: ``alignfuse train`` trains an ALBEF (ITC + ITM + MLM) or an open_clip CLIP on Karpathy-style
image-caption data (e.g. the synthetic scenes written by ``alignfuse scenes``). The work is
:func:`alignfuse.training.run_training`'s; this module parses the flags into a
:class:`~alignfuse.training.TrainRun` and shows progress."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import typer

from alignfuse.errors import InvalidInputError


def train(
    data: Path = typer.Option(..., "--data", help="Karpathy-style JSON of training pairs."),
    image_root: Path | None = typer.Option(
        None, "--image-root", help="Folder the JSON's image paths are under."
    ),
    val: Path | None = typer.Option(
        None, "--val", help="Karpathy-style JSON for the end-of-epoch evaluation."
    ),
    arch: str = typer.Option("albef", "--arch", help="albef | clip"),
    model_config: str = typer.Option(
        "tiny", "--model-config", help="ALBEF: config name or config.json; CLIP: open_clip config JSON."
    ),
    vocab: Path | None = typer.Option(None, "--vocab", help="WordPiece vocab.txt (ALBEF)."),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(3e-4, "--lr"),
    warmup_steps: int = typer.Option(100, "--warmup-steps"),
    weight_decay: float = typer.Option(0.02, "--weight-decay"),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder: checkpoint, log, final weights."),
    name: str | None = typer.Option(None, "--name", help="Stem of the exported weights (default: arch)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pth."),
    device: str = typer.Option("cpu", "--device"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast, GPU only)."),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Stop (and checkpoint) after this long."
    ),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N optimizer steps."),
    seed: int = typer.Option(0, "--seed"),
    mlm: bool = typer.Option(True, "--mlm/--no-mlm", help="ALBEF: masked language modelling."),
    concept_mask: float = typer.Option(
        0.5,
        "--concept-mask",
        help="ALBEF MLM: share of captions whose colour / shape / relation words are all masked together.",
    ),
    perturb_negatives: bool = typer.Option(True, "--perturb-negatives/--no-perturb-negatives"),
    perturb_count: int = typer.Option(
        1, "--perturb-count", help="ALBEF: perturbed captions per image and step."
    ),
    attribute_captions: int = typer.Option(
        0,
        "--attribute-captions",
        help="ALBEF: extra ITM pairs per image and step whose caption names one attribute alone "
        "('a red shape', 'a triangle'), half true, half false.",
    ),
    perturb_easy: tuple[float, float] = typer.Option(
        (0.0, 0.0), "--perturb-easy", help="ALBEF: share of easy perturbations (absent word), start and end."
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from a checkpoint's model weights."
    ),
    group_mix: float = typer.Option(
        0.0, "--group-mix", help="Share of each batch filled with group siblings."
    ),
    group_mix_after: float = typer.Option(1.0, "--group-mix-after", help="Epochs before --group-mix starts."),
    mate_mix: float = typer.Option(
        0.0,
        "--mate-mix",
        help="Share of each batch filled with colour mates (same colours, other shapes) of other batch images.",
    ),
    mate_mix_after: float = typer.Option(0.0, "--mate-mix-after", help="Epochs before --mate-mix starts."),
    queue_size: int = typer.Option(4096, "--queue-size"),
    momentum: float = typer.Option(0.995, "--momentum", help="ALBEF: momentum-encoder EMA factor."),
    itm_balance: bool = typer.Option(
        False, "--itm-balance/--no-itm-balance", help="ALBEF: weight ITM classes equally."
    ),
    bow: float = typer.Option(
        0.0,
        "--bow",
        help="Weight of the bag-of-words objective, ALBEF and CLIP (predict from the image the words and word pairs of "
        "its captions; 0 = off).",
    ),
    bow_buckets: int = typer.Option(
        2048,
        "--bow-buckets",
        help="Hashed buckets for the word pairs of --bow (0 = single words only).",
    ),
    object_itc: float = typer.Option(
        0.0,
        "--object-itc",
        help="Weight of the object ITC, ALBEF and CLIP: a contrastive loss between images and short captions naming one "
        "of their objects ('a red circle', 'a circle'), every image the caption is true of a positive "
        "(synthetic scenes; 0 = off).",
    ),
    time_schedule: bool = typer.Option(False, "--time-schedule", help="Anneal the LR over --max-minutes."),
    mlm_distill: bool = typer.Option(
        True, "--mlm-distill/--no-mlm-distill", help="ALBEF: distil MLM from the momentum model."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N images (smoke runs)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    eval_images: int = typer.Option(500, "--eval-images"),
) -> None:
    """Train the project's small models (ALBEF or CLIP) and export loadable weights into OUT."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from alignfuse.training import ModelOptions, TrainOptions, TrainRun, prepare_training
    from alignfuse.training.options import Arch, Precision

    if arch not in ("albef", "clip"):
        raise InvalidInputError("--arch must be albef or clip")
    if object_itc < 0:
        raise InvalidInputError("--object-itc must be >= 0")
    run = TrainRun(
        data=data,
        out=out,
        val=val,
        image_root=image_root,
        name=name,
        resume=resume,
        init_from=init_from,
        limit=limit,
        threads=threads,
        model=ModelOptions(
            config=model_config,
            vocab=vocab,
            mlm=mlm,
            concept_mask=concept_mask,
            mlm_distill=mlm_distill,
            queue_size=queue_size,
            momentum=momentum,
            itm_balance=itm_balance,
            bow_weight=bow,
            bow_buckets=bow_buckets,
            object_itc=object_itc,
        ),
        train=TrainOptions(
            arch=cast(Arch, arch),
            epochs=epochs,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            max_minutes=max_minutes,
            save_every=save_every,
            seed=seed,
            device=device,
            precision=cast(Precision, precision),
            perturb_negatives=perturb_negatives,
            perturb_count=perturb_count,
            attribute_captions=attribute_captions,
            perturb_easy_start=perturb_easy[0],
            perturb_easy_end=perturb_easy[1],
            group_mix=group_mix,
            group_mix_after=group_mix_after,
            mate_mix=mate_mix,
            mate_mix_after=mate_mix_after,
            eval_max_images=eval_images,
            time_schedule=time_schedule,
        ),
    )
    prepared = prepare_training(run)
    with Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task("train", total=None, epoch=0, losses="")

        def progress(rec: dict[str, Any]) -> None:
            if "val" in rec:
                bar.console.print(f"epoch {rec['epoch_done']} val: {json.dumps(rec['val'])}")
                return
            if "batch" not in rec:  # an epoch's end without validation data
                return
            losses = " ".join(
                f"{k}={rec[k]:.3f}"
                for k in ("loss", "itc", "itm", "mlm", "bow", "itm_acc")
                if k in rec and rec[k] == rec[k]  # NaN: an objective that is off
            )
            bar.update(task, completed=rec["batch"], total=rec["batches"], epoch=rec["epoch"], losses=losses)

        result = prepared.train(progress)
    typer.echo(
        f"trained {result.state.step} steps in {time.monotonic() - prepared.started:.0f}s; wrote "
        + ", ".join(map(str, result.files))
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("train")(train)
