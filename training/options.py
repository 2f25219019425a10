"""Typed, frozen options of a training run: the loop's (:class:`TrainOptions`), the model's
(:class:`ModelOptions`) and the whole run's (:class:`TrainRun`, what ``alignfuse train`` parses its flags into)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignfuse.errors import InvalidInputError

Arch = Literal["albef", "clip"]
ARCHS: tuple[str, ...] = ("albef", "clip")
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainOptions:
    """The loop: optimisation, schedule, batches, extra ITM pairs, checkpoints, end-of-epoch diagnostics."""

    arch: Arch = "albef"
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.02
    max_minutes: float | None = None
    save_every: int = 0  # optimizer steps; 0 = only at epoch ends
    seed: int = 0
    device: str = "cpu"
    precision: Precision = "fp32"
    #: ITM extra negatives from caption perturbation (when the data has ``perturb``)
    perturb_negatives: bool = True
    perturb_count: int = 1  # perturbed captions per image and step
    #: ITM pairs per image and step with a caption naming one attribute alone, half true, half false
    #: (when the data has ``attribute``)
    attribute_captions: int = 0
    #: curriculum: share of easy perturbations (absent colour/shape) from start to end of training
    perturb_easy_start: float = 0.0
    perturb_easy_end: float = 0.0
    #: from epoch ``group_mix_after`` on, this fraction of each batch are group siblings of other batch images
    group_mix: float = 0.0
    group_mix_after: float = 1.0
    #: from epoch ``mate_mix_after`` on, this fraction of each batch are colour mates of other batch images (same
    #: colours, other shapes: negatives that only shape tells apart)
    mate_mix: float = 0.0
    mate_mix_after: float = 0.0
    #: momentum-distillation alpha ramps from 0 over this many steps (default: one epoch)
    alpha_ramp_steps: int | None = None
    eval_rerank_k: int = 8
    eval_max_images: int = 500
    grad_clip: float = 5.0
    #: with ``max_minutes``: anneal the learning rate over the time budget (progress = max(step, time) share)
    time_schedule: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InvalidInputError("arch must be albef or clip")
        if self.batch_size < 2:
            raise InvalidInputError("batch size must be >= 2")
        if self.epochs < 1 or self.grad_accum < 1:
            raise InvalidInputError("epochs and grad_accum must be >= 1")
        if self.perturb_count < 0 or self.attribute_captions < 0:
            raise InvalidInputError("perturb_count and attribute_captions must be >= 0")
        if not 0.0 <= self.group_mix < 1.0:
            raise InvalidInputError("group_mix must lie in [0, 1)")
        if not 0.0 <= self.mate_mix < 1.0 or self.group_mix + self.mate_mix >= 1.0:
            raise InvalidInputError("mate_mix must lie in [0, 1) and group_mix + mate_mix below 1")
        if self.precision not in ("fp32", "bf16"):
            raise InvalidInputError("precision must be fp32 or bf16")


@dataclass(frozen=True)
class ModelOptions:
    """What to build. ``config``: ALBEF config name or config.json; CLIP: an open_clip config JSON. The rest
    is ALBEF's (:class:`~alignfuse.training.objectives_albef.AlbefTrainingOptions`); CLIP ignores it."""

    config: str = "tiny"
    vocab: Path | None = None  # WordPiece vocab.txt
    mlm: bool = True
    #: MLM: share of captions whose colour / shape / relation words are all masked together
    concept_mask: float = 0.5
    mlm_distill: bool = True
    queue_size: int = 4096
    momentum: float = 0.995
    itm_balance: bool = False
    #: bag-of-words objective (:mod:`alignfuse.training.bow`): its weight (0 = off) and hashed word-pair buckets
    bow_weight: float = 0.0
    bow_buckets: int = 2048
    #: ALBEF: weight of the object ITC (short captions naming one object, every true image a positive; 0 = off)
    object_itc: float = 0.0


@dataclass(frozen=True)
class TrainRun:
    """One ``alignfuse train`` run: data, model, loop options and where the results go.

    ``out`` gets ``checkpoint.pth``, ``train_log.jsonl`` and the exported weights ``<name>.safetensors`` +
    ``<name>.json`` (``name`` defaults to the arch). ``resume`` continues from ``out/checkpoint.pth``;
    ``init_from`` starts from another checkpoint's model weights. ``limit``: only the first N training images.
    ``threads``: torch CPU threads (None: torch's default)."""

    data: Path
    out: Path = Path("runs/train")
    val: Path | None = None
    image_root: Path | None = None
    name: str | None = None
    resume: bool = False
    init_from: Path | None = None
    limit: int | None = None
    threads: int | None = None
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
