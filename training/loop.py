"""The training loop (:class:`Trainer`) for the project's own models (ALBEF and open_clip CLIP).

It runs :class:`~alignfuse.training.options.TrainOptions` over in-memory
:class:`~alignfuse.training.data.PairData` with a :class:`~alignfuse.training.adapters.ModelAdapter`: AdamW,
linear warm-up then cosine decay (:mod:`alignfuse.training.schedule`), gradient accumulation, periodic
checkpoints that resume to the same state (model incl. momentum encoders and queues, optimizer, scheduler,
step, RNG states), an optional wall-clock budget, and, when validation data is given, the diagnostics of
:func:`~alignfuse.training.diagnostics.diagnose` after every epoch. Every optimizer step and every epoch end
appends one JSON record to ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignfuse.errors import CheckpointError
from alignfuse.training.adapters import ModelAdapter
from alignfuse.training.data import PairData, epoch_batches
from alignfuse.training.diagnostics import diagnose
from alignfuse.training.options import TrainOptions
from alignfuse.training.schedule import cosine_lambda, lr_floor, time_progress, warmup_cosine

log = logging.getLogger(__name__)

#: parameter prefixes of heads that only training uses, which a new stage may add or drop (``init_from``)
_STAGE_HEADS = ("bow_head.",)


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    elapsed_s: float = 0.0  # training wall time over all sessions (time-based schedule)
    history: list[dict[str, Any]] = field(default_factory=list)


def _param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim < 2
            or "LayerNorm" in name
            or name.endswith(("bias", "temp", "logit_scale"))
            or "pos_embed" in name
            or "cls_token" in name
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Runs :class:`TrainOptions` over :class:`PairData` with a model adapter; see the module docstring."""

    def __init__(
        self,
        arch: ModelAdapter,
        data: PairData,
        opts: TrainOptions,
        out_dir: str | Path,
        val: PairData | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.arch = arch
        self.data = data
        self.opts = opts
        self.val = val
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.batches_per_epoch = len(epoch_batches(data, opts, 0))
        steps_per_epoch = math.ceil(self.batches_per_epoch / opts.grad_accum)
        self.total_steps = steps_per_epoch * opts.epochs
        self.optimizer = torch.optim.AdamW(
            _param_groups(arch.model, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(self.total_steps, opts.warmup_steps, opts.lr, opts.min_lr)
        )
        self.state = TrainState()
        self._session_start = time.monotonic()
        self.log_path = self.out / "train_log.jsonl"

    # ----------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pth"

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = path or self.checkpoint_path()
        model = self.arch.model
        blob = {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "config": _jsonable_config(model),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "batch_in_epoch": self.state.batch_in_epoch,
            "elapsed_s": self.state.elapsed_s + (time.monotonic() - self._session_start),
            "history": json.dumps(self.state.history),
            "options": json.dumps(asdict(self.opts)),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": json.dumps(np.random.get_state(legacy=False), default=_np_default),
                "python": json.dumps(random.getstate()),
            },
        }
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        log.info("saved checkpoint %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)
        return path

    def init_model_from(self, path: str | Path) -> None:
        """Start from a checkpoint's model weights (incl. momentum encoders and queues) with fresh optimizer,
        schedule and step count (a second training stage)."""
        p = Path(path)
        if p.is_dir():
            p = p / "checkpoint.pth"
        if not p.is_file():
            raise CheckpointError(f"no checkpoint at {p}")
        blob = torch.load(p, map_location="cpu", weights_only=True)
        missing, unexpected = self.arch.model.load_state_dict(blob.get("model", blob), strict=False)
        # training-only heads (bag of words) may be added or dropped between stages
        missing = [k for k in missing if not k.startswith(_STAGE_HEADS)]
        unexpected = [k for k in unexpected if not k.startswith(_STAGE_HEADS)]
        if missing or unexpected:
            raise CheckpointError(
                f"{p} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        idx_queue = getattr(self.arch.model, "idx_queue", None)
        if isinstance(idx_queue, torch.Tensor):
            # the queue's image ids index the *previous* stage's data: keep its features as negatives, but
            # never read them as the ids of this stage's images (ITC positives, object-claim truth)
            idx_queue.fill_(-100)
        log.info("initialised the model from %s (step %s)", p, blob.get("step"))

    def load_checkpoint(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "checkpoint.pth"
        if not p.is_file():
            raise CheckpointError(f"no checkpoint to resume from at {p}")
        blob = torch.load(p, map_location="cpu", weights_only=True)
        missing, unexpected = self.arch.model.load_state_dict(blob["model"], strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {p} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["lr_scheduler"])
        self.state = TrainState(
            epoch=int(blob["epoch"]),
            step=int(blob["step"]),
            batch_in_epoch=int(blob["batch_in_epoch"]),
            elapsed_s=float(blob.get("elapsed_s", 0.0)),
            history=json.loads(blob["history"]),
        )
        self._session_start = time.monotonic()
        torch.set_rng_state(blob["rng"]["torch"])
        st = json.loads(blob["rng"]["numpy"])
        np.random.set_state(st)
        py = json.loads(blob["rng"]["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        log.info("resumed from %s at epoch %d, step %d", p, self.state.epoch, self.state.step)

    # ----------------------------------------------------------- loop
    def _autocast(self) -> Any:
        dev = next(self.arch.model.parameters()).device
        if dev.type == "cuda" and self.opts.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train(self, max_steps: int | None = None) -> TrainState:
        """Train until the epochs are done, ``max_steps`` optimizer steps were taken (in this call), or the
        time budget runs out. Returns the final state; checkpoints and logs are under ``out_dir``."""
        opts = self.opts
        model = self.arch.model
        model.train()
        start = time.monotonic()
        self._session_start = start
        steps_here = 0
        t_last, n_last = time.monotonic(), 0
        stop = False
        while self.state.epoch < opts.epochs and not stop:
            batches = epoch_batches(self.data, opts, self.state.epoch)
            accum = 0
            self.optimizer.zero_grad(set_to_none=True)
            while self.state.batch_in_epoch < len(batches):
                b = self.state.batch_in_epoch
                frac = (b + 1) / len(batches) if self.state.epoch == 0 else 1.0
                torch.manual_seed(opts.seed * 1_000_003 + self.state.step * 97 + accum)
                self.data.perturb_easy = self._easy_share(start)
                with self._autocast():
                    out = self.arch.step_loss(self.data, batches[b], self.state.step, frac)
                loss = out.pop("_total") / opts.grad_accum
                loss.backward()
                accum += 1
                self.state.batch_in_epoch += 1
                n_last += len(batches[b])
                if accum < opts.grad_accum and self.state.batch_in_epoch < len(batches):
                    continue
                if opts.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                if opts.time_schedule and opts.max_minutes:
                    self._time_lr(self.state.elapsed_s + time.monotonic() - start)
                self.optimizer.zero_grad(set_to_none=True)
                accum = 0
                self.state.step += 1
                steps_here += 1
                now = time.monotonic()
                rec = {
                    "epoch": self.state.epoch,
                    "step": self.state.step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    **{k: v for k, v in out.items() if not k.startswith("_")},
                }
                if now - t_last > 0:
                    rec["samples_per_s"] = n_last / (now - t_last)
                t_last, n_last = now, 0
                self._log(rec)
                if self.progress:
                    self.progress({**rec, "batch": self.state.batch_in_epoch, "batches": len(batches)})
                if opts.save_every and self.state.step % opts.save_every == 0:
                    self.save_checkpoint()
                if max_steps is not None and steps_here >= max_steps:
                    stop = True
                    break
                if (
                    opts.max_minutes is not None
                    and (self.state.elapsed_s + now - start) / 60 >= opts.max_minutes
                ):
                    log.info("time budget of %.1f min reached at step %d", opts.max_minutes, self.state.step)
                    stop = True
                    break
            if self.state.batch_in_epoch >= len(batches):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self.end_of_epoch()
        if stop and self.state.batch_in_epoch:
            self.save_checkpoint()
        return self.state

    def _progress(self, start: float) -> float:
        if self.opts.time_schedule and self.opts.max_minutes:
            elapsed = self.state.elapsed_s + time.monotonic() - start
            return time_progress(self.state.step, self.total_steps, elapsed, self.opts.max_minutes * 60)
        return min(1.0, self.state.step / max(1, self.total_steps))

    def _easy_share(self, start: float) -> float:
        a, b = self.opts.perturb_easy_start, self.opts.perturb_easy_end
        if a == b:
            return a
        return a + (b - a) * self._progress(start)

    def _time_lr(self, elapsed: float) -> None:
        """The time-budget schedule: the same warm-up + cosine, its progress the larger of steps and time."""
        opts = self.opts
        assert opts.max_minutes
        progress = time_progress(self.state.step, self.total_steps, elapsed, opts.max_minutes * 60)
        f = warmup_cosine(self.state.step, progress, opts.warmup_steps, lr_floor(opts.lr, opts.min_lr))
        for g in self.optimizer.param_groups:
            g["lr"] = opts.lr * f

    def end_of_epoch(self) -> None:
        rec: dict[str, Any] = {"epoch_done": self.state.epoch, "step": self.state.step}
        if self.val is not None:
            t0 = time.monotonic()
            res = diagnose(
                self.arch, self.val, self.opts.eval_max_images, self.opts.eval_rerank_k, self.opts.seed
            )
            rec["val"] = res.as_dict()
            rec["eval_s"] = round(time.monotonic() - t0, 1)
        self.state.history.append(rec)
        self._log(rec)
        if self.progress:
            self.progress(rec)
        self.save_checkpoint()

    def _log(self, rec: dict[str, Any]) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _jsonable_config(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        return json.dumps(cfg.to_dict())
    return "{}"
