"""The learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``. One definition
(:func:`warmup_cosine`), driven either by the step count (:func:`cosine_lambda`, for ``LambdaLR``) or, with a
time budget, by the larger of the step and wall-clock shares (:func:`time_progress`)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(step: int, progress: float, warmup: int, floor: float) -> float:
    """Learning-rate factor: ``(step + 1) / warmup`` during the first ``warmup`` steps, then a cosine from 1
    down to ``floor`` (= min_lr / lr) as ``progress`` goes from 0 to 1 (clamped)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def lr_floor(base_lr: float, min_lr: float) -> float:
    return min_lr / base_lr if base_lr > 0 else 0.0


def cosine_lambda(total_steps: int, warmup: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """``LambdaLR``'s factor by step: the cosine spans the steps after the warm-up."""
    floor = lr_floor(base_lr, min_lr)

    def f(step: int) -> float:
        return warmup_cosine(step, (step - warmup) / max(1, total_steps - warmup), warmup, floor)

    return f


def time_progress(step: int, total_steps: int, elapsed_s: float, budget_s: float) -> float:
    """Progress of a run with a time budget: the larger of its step share and its time share, at most 1."""
    return min(1.0, max(elapsed_s / budget_s, step / max(1, total_steps)))
