"""Training: ALBEF's objectives (ITC with momentum distillation, ITM with hard negatives, MLM) and CLIP's, the
in-memory pair data, the loop, checkpoints and diagnostics. May import ``evaluation``, ``data``, ``models``.

Modules: ``options`` (the typed run options), ``data`` (pairs, the Karpathy-style reader, epoch batches),
``objectives_albef`` (ALBEF's losses and checkpoint layouts), ``adapters`` (ALBEF / CLIP behind one interface,
and the model builders), ``schedule`` (the learning-rate schedule), ``diagnostics`` (the end-of-epoch numbers),
``loop`` (the trainer and its checkpoints), ``run`` (one ``alignfuse train`` run).
"""

from alignfuse.training.adapters import (
    AlbefArch,
    ClipArch,
    ModelAdapter,
    build_adapter,
    build_albef,
    build_clip,
)
from alignfuse.training.data import PairData, attach_scene_functions, epoch_batches, load_pairs
from alignfuse.training.diagnostics import Diagnostics, diagnose
from alignfuse.training.loop import Trainer, TrainState
from alignfuse.training.options import ModelOptions, TrainOptions, TrainRun
from alignfuse.training.run import PreparedTraining, TrainResult, prepare_training, run_training
from alignfuse.training.schedule import cosine_lambda, warmup_cosine

__all__ = [
    "AlbefArch",
    "ClipArch",
    "Diagnostics",
    "ModelAdapter",
    "ModelOptions",
    "PairData",
    "PreparedTraining",
    "TrainOptions",
    "TrainResult",
    "TrainRun",
    "TrainState",
    "Trainer",
    "attach_scene_functions",
    "build_adapter",
    "build_albef",
    "build_clip",
    "cosine_lambda",
    "diagnose",
    "epoch_batches",
    "load_pairs",
    "prepare_training",
    "run_training",
    "warmup_cosine",
]
