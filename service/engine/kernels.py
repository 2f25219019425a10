"""The batch kernels the device workers run (one set per model), and their payload types.

Each kernel is a :data:`~alignfuse.service.batching.Handler` of a
:class:`~alignfuse.service.batching.DeviceWorker`: one call per gathered batch of tasks (not an HTTP handler).
The dual encoder's kernels (``texts``, ``images``) encode text and image batches; the cross-encoder's
``rerank`` scores the pairs of several requests together (one text tower pass over every query, one vision
pass over every image that is not cached, the pairs in forwards of at most ``max_pairs``) and ``tokens``
computes the vision tokens the feature cache stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignfuse.errors import AlignfuseError
from alignfuse.models.base import CrossEncoder, DualEncoder, ImageStates

BULK_CHUNK = 64


@dataclass(frozen=True)
class RerankJob:
    """The pairs of one request: ``texts`` is 1 text (broadcast over the images) or one per pair;
    images are ``tokens`` (fp16 [a, L, D], from a cache) followed by ``pixels`` ([b, 3, H, W], recomputed)."""

    texts: tuple[str, ...]
    tokens: torch.Tensor | None
    pixels: torch.Tensor | None

    @property
    def n_images(self) -> int:
        return (0 if self.tokens is None else len(self.tokens)) + (
            0 if self.pixels is None else len(self.pixels)
        )

    @property
    def n_pairs(self) -> int:
        return max(len(self.texts), self.n_images)


@dataclass(frozen=True)
class RerankOut:
    logit: np.ndarray
    prob: np.ndarray
    new_tokens: torch.Tensor | None  # fp16 tokens computed from ``pixels`` (to cache), else None


def _split_rows(arr: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    out, start = [], 0
    for n in sizes:
        out.append(arr[start : start + n])
        start += n
    return out


class DualKernels:
    """Batch kernels of the dual-encoder worker: payloads are lists of texts / pixel batches."""

    def __init__(self, model: DualEncoder) -> None:
        self.model = model

    def texts(self, payloads: list[Any]) -> list[np.ndarray | AlignfuseError]:
        texts: list[str] = [t for p in payloads for t in p]
        try:
            vecs = np.concatenate(
                [
                    self.model.encode_texts(texts[i : i + BULK_CHUNK * 4])
                    for i in range(0, len(texts), BULK_CHUNK * 4)
                ]
            )
        except AlignfuseError:
            # one request's bad text (e.g. a caption ALBEF's cleaning empties) must fail that request alone, not
            # the others batched with it: encode each request on its own and hand back its error
            return [self._one(p) for p in payloads]
        return list(_split_rows(vecs, [len(p) for p in payloads]))

    def _one(self, texts: list[str]) -> np.ndarray | AlignfuseError:
        try:
            return self.model.encode_texts(texts)
        except AlignfuseError as exc:
            return exc

    def images(self, payloads: list[Any]) -> list[np.ndarray]:
        pixels = torch.cat(payloads)
        vecs = np.concatenate(
            [self.model.encode_images(pixels[i : i + BULK_CHUNK]) for i in range(0, len(pixels), BULK_CHUNK)]
        )
        return _split_rows(vecs, [len(p) for p in payloads])


class CrossKernels:
    """Batch kernels of the cross-encoder worker: ``rerank`` (RerankJob payloads) and ``tokens`` (vision
    tokens of pixel batches, for the feature cache of uploads)."""

    def __init__(self, model: CrossEncoder, max_pairs: int) -> None:
        self.model = model
        self.max_pairs = max_pairs

    @torch.inference_mode()
    def tokens(self, payloads: list[Any]) -> list[np.ndarray]:
        """Vision tokens (fp16) of pixel batches: what the feature cache stores."""
        pixels = torch.cat(payloads)
        parts = [
            self.model.image_states(pixels[i : i + BULK_CHUNK]).tokens.to("cpu", torch.float16)
            for i in range(0, len(pixels), BULK_CHUNK)
        ]
        return _split_rows(torch.cat(parts).numpy(), [len(p) for p in payloads])

    def _score_chunks(self, text_idx: torch.Tensor, img_idx: torch.Tensor, ts: Any, st: ImageStates) -> Any:
        logits, probs = [], []
        for a in range(0, len(text_idx), self.max_pairs):
            b = a + self.max_pairs
            out = self.model.score(ts.select(text_idx[a:b]), st.select(img_idx[a:b]))
            logits.append(np.asarray(out.logit, dtype=np.float32))
            probs.append(np.asarray(out.prob, dtype=np.float32))
        return np.concatenate(logits), np.concatenate(probs)

    @torch.inference_mode()
    def rerank(self, payloads: list[Any]) -> list[RerankOut]:
        jobs: list[RerankJob] = payloads
        model = self.model
        dev = model.device
        # 1. every text of every job through the text tower at once
        all_texts = [t for j in jobs for t in j.texts]
        ts = model.text_states(all_texts)
        # 2. images: recompute tokens from pixels in one vision pass, rounded to fp16 like the cache so a
        #    candidate scores the same whichever way its states arrived
        pix = [j.pixels for j in jobs if j.pixels is not None]
        new_tok: torch.Tensor | None = None
        if pix:
            pixels = torch.cat(pix)
            new_tok = torch.cat(
                [
                    model.image_states(pixels[i : i + BULK_CHUNK]).tokens.to(torch.float16)
                    for i in range(0, len(pixels), BULK_CHUNK)
                ]
            )
        parts: list[torch.Tensor] = []
        new_sizes: list[int] = []
        pix_off = 0
        for j in jobs:
            if j.tokens is not None:
                parts.append(j.tokens.to(dev, torch.float16))
            if j.pixels is not None:
                assert new_tok is not None
                parts.append(new_tok[pix_off : pix_off + len(j.pixels)].to(dev))
                pix_off += len(j.pixels)
            new_sizes.append(0 if j.pixels is None else len(j.pixels))
        states = model.image_states_from_tokens(torch.cat(parts))
        # 3. pairs. Jobs with one text and many images (text→image) are merged into one aligned forward
        #    (the query's text states are small to repeat); a job with one image and many texts
        #    (image→text) is scored with the image broadcast, never copying its states per pair.
        scored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        text_idx: list[torch.Tensor] = []
        img_idx: list[torch.Tensor] = []
        aligned: list[tuple[int, int]] = []
        t_off = i_off = 0
        for n_job, j in enumerate(jobs):
            n = j.n_pairs
            nt, ni = len(j.texts), j.n_images
            if ni == 1 and nt > 1:
                image = states.select([i_off])
                parts_l, parts_p = [], []
                for a in range(0, nt, self.max_pairs):
                    idx = torch.arange(t_off + a, t_off + min(nt, a + self.max_pairs))
                    out = model.score(ts.select(idx), image)
                    parts_l.append(np.asarray(out.logit, dtype=np.float32))
                    parts_p.append(np.asarray(out.prob, dtype=np.float32))
                scored[n_job] = (np.concatenate(parts_l), np.concatenate(parts_p))
            else:
                text_idx.append(torch.full((n,), t_off) if nt == 1 else torch.arange(t_off, t_off + nt))
                img_idx.append(torch.full((n,), i_off) if ni == 1 else torch.arange(i_off, i_off + ni))
                aligned.append((n_job, n))
            t_off += nt
            i_off += ni
        if aligned:
            logit, prob = self._score_chunks(torch.cat(text_idx), torch.cat(img_idx), ts, states)
            off = 0
            for n_job, n in aligned:
                scored[n_job] = (logit[off : off + n], prob[off : off + n])
                off += n
        outs: list[RerankOut] = []
        p_off = 0
        cpu_new = None if new_tok is None else new_tok.to("cpu")
        for n_job, ns in enumerate(new_sizes):
            nt_ = None if cpu_new is None or ns == 0 else cpu_new[p_off : p_off + ns]
            p_off += ns
            lg, pr = scored[n_job]
            outs.append(RerankOut(lg.copy(), pr.copy(), nt_))
        return outs
