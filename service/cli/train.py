"""CLI commands: ``alignfuse train`` trains an ALBEF (ITC + ITM + MLM) or an open_clip CLIP on Karpathy-style
image-caption data (e.g. the synthetic scenes written by ``alignfuse scenes``)."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from PIL import Image

from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.training.loop import PairData

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- data


def load_pairs(path: Path, image_root: Path | None, image_size: int, limit: int | None = None) -> PairData:
    """Read a Karpathy-style JSON (``[{"image", "caption": str | [str]}]``) into memory at ``image_size``
    (bicubic squash, as ALBEF). Entries with ``objects`` (the synthetic scenes) also get the caption
    perturbation and matching functions; a ``group`` key gives the hard-negative groups."""
    if not path.is_file():
        raise NotFoundError(f"training data {path} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise InvalidInputError(f"{path} must hold a list of {{image, caption}} records")
    root = image_root or path.parent
    # one image per distinct file, captions grouped under it
    by_image: dict[str, dict[str, Any]] = {}
    for e in entries:
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            continue
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        rec = by_image.setdefault(
            e["image"], {"captions": [], "group": e.get("group"), "objects": e.get("objects")}
        )
        rec["captions"] += [c for c in caps if isinstance(c, str) and c.strip()]
    keys = list(by_image)[: limit or None]
    images: list[torch.Tensor] = []
    captions: list[str] = []
    image_of: list[int] = []
    groups: list[Any] = []
    objects: list[Any] = []
    skipped = 0
    for key in keys:
        rec = by_image[key]
        try:
            with Image.open(root / key) as im:
                rgb = im.convert("RGB")
                if rgb.size != (image_size, image_size):
                    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
                arr = np.asarray(rgb, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable image %s: %s", root / key, exc)
            skipped += 1
            continue
        if not rec["captions"]:
            continue
        i = len(images)
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        for c in rec["captions"]:
            captions.append(c)
            image_of.append(i)
        groups.append(rec["group"])
        objects.append(rec["objects"])
    if not images:
        raise InvalidInputError(f"{path}: no readable image-caption pairs")
    if skipped:
        log.warning("%d unreadable images skipped", skipped)
    has_groups = all(g is not None for g in groups)
    data = PairData(
        torch.stack(images), captions, image_of, groups=[int(g) for g in groups] if has_groups else None
    )
    if all(o is not None for o in objects):
        _attach_scene_functions(data, objects)
    return data


def _attach_scene_functions(data: PairData, objects: list[Any]) -> None:
    from alignfuse.data.scenes import (
        SceneObject,
        attribute_caption,
        claim_holds,
        parse_caption,
        perturb_caption,
    )

    scene_objs = [[SceneObject(**o) for o in objs] for objs in objects]
    # (colour, shape) pairs the training images contain; perturbed negatives never mention any other pair
    seen_pairs = frozenset((o.colour, o.shape) for objs in scene_objs for o in objs)
    parse = functools.lru_cache(maxsize=200_000)(parse_caption)

    def matches(caption: str, image: int) -> bool:
        return claim_holds(parse(caption), scene_objs[image])

    def perturb(caption: str, image: int, rng: np.random.Generator) -> str | None:
        return perturb_caption(
            caption, scene_objs[image], rng, easy=data.perturb_easy, allowed_pairs=seen_pairs
        )

    def attribute(image: int, true: bool, rng: np.random.Generator) -> str | None:
        return attribute_caption(scene_objs[image], rng, true=true)

    data.matches = matches
    data.perturb = perturb
    data.attribute = attribute


# ---------------------------------------------------------------------------------------------- command


def _concept_groups(tok: Any) -> tuple[tuple[int, ...], ...]:
    from alignfuse.data.scenes import COLOURS, RELATIONS, SHAPES

    vocab = tok.tokenizer.vocab
    groups = []
    colour_ids = tuple(vocab[w] for w in COLOURS if w in vocab)
    shape_words = [*SHAPES, *(s + ("es" if s == "cross" else "s") for s in SHAPES)]
    shape_ids = tuple(vocab[w] for w in shape_words if w in vocab)
    rel_ids = tuple(vocab[w] for w in {r.split()[0] for r in RELATIONS} if w in vocab)
    for g in (colour_ids, shape_ids, rel_ids):
        if g:
            groups.append(g)
    return tuple(groups)


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
    queue_size: int = typer.Option(4096, "--queue-size"),
    momentum: float = typer.Option(0.995, "--momentum", help="ALBEF: momentum-encoder EMA factor."),
    itm_balance: bool = typer.Option(
        False, "--itm-balance/--no-itm-balance", help="ALBEF: weight ITM classes equally."
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

    from alignfuse.training.loop import Trainer, TrainOptions

    if threads:
        torch.set_num_threads(threads)
    if arch not in ("albef", "clip"):
        raise InvalidInputError("--arch must be albef or clip")
    if precision == "bf16" and not device.startswith("cuda"):
        log.warning("bf16 autocast is only used on GPU; training in fp32 on %s", device)
        precision = "fp32"
    opts = TrainOptions(
        arch=arch,  # type: ignore[arg-type]
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
        precision=precision,  # type: ignore[arg-type]
        perturb_negatives=perturb_negatives,
        perturb_count=perturb_count,
        attribute_captions=attribute_captions,
        perturb_easy_start=perturb_easy[0],
        perturb_easy_end=perturb_easy[1],
        group_mix=group_mix,
        group_mix_after=group_mix_after,
        eval_max_images=eval_images,
        time_schedule=time_schedule,
    )
    torch.manual_seed(seed)
    dev = torch.device(device)
    if arch == "albef":
        arch_obj, size = _build_albef(
            model_config, vocab, mlm, concept_mask, queue_size, dev, opts, mlm_distill, momentum, itm_balance
        )
    else:
        arch_obj, size = _build_clip(model_config, dev, opts)
    t0 = time.monotonic()
    train_data = load_pairs(data, image_root, size, limit)
    val_data = load_pairs(val, None, size, None) if val is not None else None
    log.info(
        "loaded %d images / %d captions in %.1fs",
        train_data.num_images,
        len(train_data.captions),
        time.monotonic() - t0,
    )
    out.mkdir(parents=True, exist_ok=True)
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
            losses = " ".join(
                f"{k}={rec[k]:.3f}" for k in ("loss", "itc", "itm", "mlm", "itm_acc") if k in rec
            )
            bar.update(task, completed=rec["batch"], total=rec["batches"], epoch=rec["epoch"], losses=losses)

        trainer = Trainer(arch_obj, train_data, opts, out, val=val_data, progress=progress)
        if resume:
            trainer.load_checkpoint(out)
        elif init_from is not None:
            trainer.init_model_from(init_from)
        trainer.train()
    files = arch_obj.save_weights(out, name or f"{arch}")
    typer.echo(
        f"trained {trainer.state.step} steps in {time.monotonic() - t0:.0f}s; wrote "
        + ", ".join(map(str, files))
    )


def _build_albef(
    model_config: str,
    vocab: Path | None,
    mlm: bool,
    concept_mask: float,
    queue_size: int,
    dev: torch.device,
    opts: Any,
    mlm_distill: bool = True,
    momentum: float = 0.995,
    itm_balance: bool = False,
):  # type: ignore[no-untyped-def]
    from alignfuse.models.albef.config import get_albef_config
    from alignfuse.models.text import AlbefTokenizer
    from alignfuse.training.loop import AlbefArch
    from alignfuse.training.objectives_albef import AlbefForTraining, AlbefTrainingOptions

    cfg = get_albef_config(model_config)
    if vocab is not None:
        if not vocab.is_file():
            raise NotFoundError(f"vocabulary {vocab} does not exist")
        cfg = cfg.replace(vocab=str(vocab.resolve()))
    tok = AlbefTokenizer(cfg.vocab, max_len=cfg.max_text_len)
    if tok.vocab_size != cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    topts = AlbefTrainingOptions(
        queue_size=queue_size,
        momentum=momentum,
        itm_balance=itm_balance,
        mlm=mlm,
        mlm_distill=mlm_distill,
        concept_mask_prob=concept_mask if mlm else 0.0,
        concept_groups=_concept_groups(tok) if mlm and concept_mask > 0 else (),
        special_ids=(tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id),
    )
    model = AlbefForTraining(cfg, topts).to(dev)
    return AlbefArch(model, tok, opts, dev), cfg.image_res


def _build_clip(model_config: str, dev: torch.device, opts: Any):  # type: ignore[no-untyped-def]
    import open_clip
    from open_clip import factory

    from alignfuse.training.loop import ClipArch

    p = Path(model_config)
    if not p.is_file():
        raise NotFoundError(f"CLIP model config {p} does not exist (an open_clip config JSON)")
    cfg = json.loads(p.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InvalidInputError(f"{p}: an open_clip config needs embed_dim, vision_cfg and text_cfg")
    arch_name = "alignfuse-train-" + p.stem
    factory._MODEL_CONFIGS[arch_name] = cfg
    model = open_clip.create_model(arch_name, pretrained=None, device=dev)
    tok = open_clip.get_tokenizer(arch_name)
    return ClipArch(model, tok, cfg, opts, dev), int(cfg["vision_cfg"]["image_size"])


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("train")(train)
