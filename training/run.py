"""One training run from a :class:`~alignfuse.training.options.TrainRun` (what ``alignfuse train`` does): build
the model, read the data, train (or resume), export loadable weights.

:func:`run_training` does it all; :func:`prepare_training` stops before the loop, so a caller can open its
progress display only for the loop (the CLI does)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from alignfuse.training.adapters import ModelAdapter, build_adapter
from alignfuse.training.data import PairData, load_pairs
from alignfuse.training.loop import Trainer, TrainState
from alignfuse.training.options import TrainRun

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its final state, the exported weight files, and its wall time since the data loading
    began (seconds)."""

    state: TrainState
    files: tuple[Path, ...]
    seconds: float


@dataclass
class PreparedTraining:
    """A run with its model built and its data in memory (see :func:`prepare_training`)."""

    run: TrainRun
    adapter: ModelAdapter
    data: PairData
    val: PairData | None
    started: float  # time.monotonic() when the data loading began

    def train(self, progress: Progress | None = None) -> TrainResult:
        """Train (resuming or initialising as the run says), then export the weights into ``run.out``.
        ``progress`` gets every log record, plus ``batch`` / ``batches`` of the epoch on step records."""
        run = self.run
        trainer = Trainer(self.adapter, self.data, run.train, run.out, val=self.val, progress=progress)
        if run.resume:
            trainer.load_checkpoint(run.out)
        elif run.init_from is not None:
            trainer.init_model_from(run.init_from)
        state = trainer.train()
        files = self.adapter.save_weights(run.out, run.name or run.train.arch)
        return TrainResult(state, tuple(files), time.monotonic() - self.started)


def prepare_training(run: TrainRun) -> PreparedTraining:
    """Set the CPU threads and the seed, build a fresh model for ``run.train.arch`` on ``run.train.device``,
    and load the training (and validation) pairs at the model's image resolution. bf16 off a GPU falls back
    to fp32 with a warning."""
    if run.threads:
        torch.set_num_threads(run.threads)
    opts = run.train
    if opts.precision == "bf16" and not opts.device.startswith("cuda"):
        log.warning("bf16 autocast is only used on GPU; training in fp32 on %s", opts.device)
        run = replace(run, train=replace(opts, precision="fp32"))
        opts = run.train
    torch.manual_seed(opts.seed)
    adapter, size = build_adapter(run.model, opts, torch.device(opts.device))
    t0 = time.monotonic()
    train_data = load_pairs(run.data, run.image_root, size, run.limit)
    val_data = load_pairs(run.val, None, size, None, split="val") if run.val is not None else None
    log.info(
        "loaded %d images / %d captions in %.1fs",
        train_data.num_images,
        len(train_data.captions),
        time.monotonic() - t0,
    )
    run.out.mkdir(parents=True, exist_ok=True)
    return PreparedTraining(run, adapter, train_data, val_data, t0)


def run_training(run: TrainRun, progress: Progress | None = None) -> TrainResult:
    """Build, load, train and export: the whole ``alignfuse train`` run (see :class:`TrainRun`)."""
    return prepare_training(run).train(progress)
