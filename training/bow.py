"""The bag-of-words objective: predict, from the image alone, which words and word pairs its captions use
(weakly supervised visual learning from captions, as in Joulin et al. 2016, "Learning Visual Features from Large
Weakly Supervised Data", and Mahajan et al. 2018, softmax over normalised multi-hot targets).

Why ALBEF training here needs it: the contrastive objective only asks the image embedding to tell the batch's
captions apart, and nearly every in-batch negative of the synthetic scenes differs in *colour*, so the vision
tower never has to read shape (``docs/training/README.md``, issue #17). Naming every caption word, and every
adjacent word pair (``red circle``, the binding), from the pooled image vector that the ITC projects asks for
shape and for colour-shape conjunctions directly, with nothing but the captions as supervision.

The label space is fixed by the tokenizer, not by the data (so a model can be built before its data is read
and a checkpoint resumes on other data): the ``V`` WordPiece ids, then ``buckets`` hashed buckets of adjacent
id pairs (the hashing trick of fastText / Joulin et al.). Special tokens are never labels."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from alignfuse.errors import InvalidInputError
from alignfuse.training.contrastive import soft_cross_entropy

_PRIME = 1_000_003


def bow_size(vocab_size: int, buckets: int) -> int:
    """Number of labels: one per WordPiece id plus ``buckets`` hashed id pairs."""
    return vocab_size + buckets


def bow_labels(ids: Sequence[int], special: Iterable[int], vocab_size: int, buckets: int) -> set[int]:
    """Label indices of one tokenized caption: its word ids and the hashed buckets of its adjacent id pairs
    (special tokens dropped first, so ``[CLS] red`` is no pair)."""
    if vocab_size < 1 or buckets < 0:
        raise InvalidInputError("bag-of-words labels need vocab_size >= 1 and buckets >= 0")
    skip = set(special)
    words = [int(t) for t in ids if int(t) not in skip and 0 <= int(t) < vocab_size]
    out = set(words)
    if buckets:
        out.update(vocab_size + (a * _PRIME + b) % buckets for a, b in zip(words, words[1:], strict=False))
    return out


class BowTable:
    """Per image, the union of the labels of all its captions; :meth:`targets` gives a batch's multi-hot rows."""

    def __init__(self, per_image: Sequence[Iterable[int]], size: int) -> None:
        self.size = size
        self._rows = [torch.tensor(sorted(set(labels)), dtype=torch.long) for labels in per_image]
        if any(int(r.max()) >= size for r in self._rows if r.numel()):
            raise InvalidInputError("a bag-of-words label lies outside the label space")

    def __len__(self) -> int:
        return len(self._rows)

    def targets(self, images: Sequence[int]) -> torch.Tensor:
        """Multi-hot float rows [len(images), size]."""
        out = torch.zeros(len(images), self.size)
        for r, i in enumerate(images):
            out[r, self._rows[i]] = 1.0
        return out


def bow_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax over all labels against the normalised multi-hot targets (rows without
    labels are ignored)."""
    return soft_cross_entropy(logits, targets > 0)
