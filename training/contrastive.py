"""Contrastive losses with several positives per row (shared by the ALBEF and CLIP objectives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` against the uniform distribution over that row's ``positives``
    (bool, same shape); rows without any positive are skipped (0 when none has one, still differentiable)."""
    pos = positives.float()
    count = pos.sum(dim=1, keepdim=True)
    rows = count.squeeze(1) > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    target = pos[rows] / count[rows]
    return -(F.log_softmax(logits[rows].float(), dim=1) * target).sum(dim=1).mean()
