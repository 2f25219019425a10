"""Scoring: dual-encoder embeddings (reused from a collection where it holds them, else encoded) and the
cross-encoder pair scorer (text and image states computed once, pairs broadcast per image)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from alignfuse.errors import EncoderMismatchError
from alignfuse.models.base import CrossEncoder, DualEncoder, ImageStates, TextStates

from .data import EvalData, open_image, pixel_batches

if TYPE_CHECKING:
    from alignfuse.index.collection import Collection

log = logging.getLogger(__name__)


@dataclass
class DualEmbeddings:
    images: np.ndarray
    texts: np.ndarray
    encoded_now: int
    source: str
    seconds: float


def _sha256_file(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def stored_embeddings(
    collection: Collection | None, data: EvalData, dual: DualEncoder
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray | None]:
    """Embeddings of eval images/texts found in the collection (matched by image uri or file sha256, and by
    caption text), plus the matched image item ids (for the feature cache) or None."""
    found_i: dict[int, np.ndarray] = {}
    found_t: dict[int, np.ndarray] = {}
    if collection is None:
        return found_i, found_t, None
    try:
        collection.check_encoder(dual.info)
    except EncoderMismatchError as exc:  # the stored vectors are another model's
        log.warning("not reusing the collection's embeddings: %s", exc.message)
        return found_i, found_t, None
    img_ids, img_vecs = collection.vectors("image")
    txt_ids, txt_vecs = collection.vectors("text")
    by_uri: dict[str, int] = {}
    by_sha: dict[str, int] = {}
    if len(img_ids):
        for n, item in enumerate(collection.get_many(img_ids)):
            by_uri.setdefault(str(item.uri), n)
            by_sha.setdefault(str(item.sha256), n)
    by_text: dict[str, int] = {}
    if len(txt_ids):
        for n, item in enumerate(collection.get_many(txt_ids)):
            if item.text is not None:
                by_text.setdefault(item.text, n)
    item_ids = np.full(data.n_images, -1, dtype=np.int64)
    for i, (rel, p) in enumerate(zip(data.images, data.image_paths, strict=True)):
        keys = [
            rel,
            str(p),
            str(p.resolve()) if p.exists() else str(p),
            p.resolve().as_uri() if p.exists() else "",
        ]
        row: int | None = next((by_uri[k] for k in keys if k in by_uri), None)
        if row is None and by_sha and p.is_file():
            sha = _sha256_file(p)
            row = by_sha.get(sha) if sha else None
        if row is not None:
            found_i[i] = np.asarray(img_vecs[row], dtype=np.float32)
            item_ids[i] = int(img_ids[row])
    for t, text in enumerate(data.texts):
        trow = by_text.get(text)
        if trow is not None:
            found_t[t] = np.asarray(txt_vecs[trow], dtype=np.float32)
    return found_i, found_t, (item_ids if (item_ids >= 0).all() else None)


def dual_embeddings(
    dual: DualEncoder,
    data: EvalData,
    stored_i: dict[int, np.ndarray],
    stored_t: dict[int, np.ndarray],
    batch_size: int,
) -> DualEmbeddings:
    t0 = time.perf_counter()
    dim = int(dual.embed_dim)
    images = np.zeros((data.n_images, dim), dtype=np.float32)
    texts = np.zeros((data.n_texts, dim), dtype=np.float32)
    for i, v in stored_i.items():
        images[i] = v
    for t, v in stored_t.items():
        texts[t] = v
    todo_i = [i for i in range(data.n_images) if i not in stored_i]
    todo_t = [t for t in range(data.n_texts) if t not in stored_t]
    with torch.inference_mode():
        paths = [data.image_paths[i] for i in todo_i]
        done = 0
        for pixels in pixel_batches(paths, dual.image_transform, batch_size):
            emb = dual.encode_images(pixels.to(dual.device))
            images[todo_i[done : done + len(emb)]] = emb
            done += len(emb)
        for a in range(0, len(todo_t), batch_size):
            idx = todo_t[a : a + batch_size]
            texts[idx] = dual.encode_texts([data.texts[t] for t in idx])
    encoded = len(todo_i) + len(todo_t)
    reused = len(stored_i) + len(stored_t)
    source = "encoded" if reused == 0 else ("collection" if encoded == 0 else "mixed")
    log.info("dual embeddings: %d reused from the collection, %d encoded now", reused, encoded)
    return DualEmbeddings(images, texts, encoded, source, time.perf_counter() - t0)


def cached_token_reader(
    collection: Collection | None, cross: CrossEncoder, item_ids: np.ndarray | None
) -> Callable[[Sequence[int]], np.ndarray] | None:
    """Image tokens of eval images from the collection's rerank feature cache (``f(image indices)``), when the
    cache was computed by ``cross`` and covers every image (``item_ids``: see :func:`stored_embeddings`)."""
    if collection is None or item_ids is None:
        return None
    cache = collection.features
    if cache is None or not cache.reranker.matches(cross.info) or not bool(cache.has(item_ids).all()):
        return None
    log.info("cross-encoder image states come from the collection's feature cache")
    return lambda imgs: cache.get(item_ids[np.asarray(imgs, dtype=np.int64)])


def _cat_text_states(parts: list[TextStates]) -> TextStates:
    """Concatenate per-batch text states, right-padding to the longest (mask 0, ids 0, hidden 0)."""
    if len(parts) == 1:
        return parts[0]
    width = max(int(p.ids.shape[1]) for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        extra = width - int(x.shape[1])
        if extra == 0:
            return x
        shape = (x.shape[0], extra, *x.shape[2:])
        return torch.cat([x, x.new_zeros(shape)], dim=1)

    ids = torch.cat([pad(p.ids) for p in parts])
    mask = torch.cat([pad(p.mask) for p in parts])
    hidden = None
    if all(p.hidden is not None for p in parts):
        hidden = torch.cat([pad(p.hidden) for p in parts if p.hidden is not None])
    return TextStates(ids, mask, hidden)


class PairScorer:
    """Scores (image, text) pairs with a cross-encoder: text states once per text, image states once per
    image (from pixels, or from the collection's feature cache), pairs grouped by image and broadcast
    (one image × up to ``batch_size`` texts per forward). Deterministic for a given pair list."""

    def __init__(
        self,
        cross: CrossEncoder,
        data: EvalData,
        batch_size: int,
        cached_tokens: Callable[[Sequence[int]], np.ndarray] | None,
    ) -> None:
        self.cross = cross
        self.data = data
        self.batch_size = batch_size
        self.cached_tokens = cached_tokens
        self._text_states: TextStates | None = None
        self._text_rows: dict[int, int] = {}
        self.text_passes = 0
        self.image_passes = 0
        self.images_from_cache = 0

    def _ensure_texts(self, needed: np.ndarray) -> TextStates:
        missing = [int(t) for t in needed if int(t) not in self._text_rows]
        if missing:
            parts = [] if self._text_states is None else [self._text_states]
            for a in range(0, len(missing), self.batch_size):
                idx = missing[a : a + self.batch_size]
                parts.append(self.cross.text_states([self.data.texts[t] for t in idx]))
            base = len(self._text_rows)
            for n, t in enumerate(missing):
                self._text_rows[t] = base + n
            self._text_states = _cat_text_states(parts)
            self.text_passes += len(missing)
        assert self._text_states is not None
        return self._text_states

    def _image_states(self, imgs: Sequence[int]) -> ImageStates:
        dev = self.cross.device
        if self.cached_tokens is not None:
            tokens = torch.from_numpy(np.ascontiguousarray(self.cached_tokens(imgs)))
            self.images_from_cache += len(imgs)
            return self.cross.image_states_from_tokens(tokens.to(dev))
        pixels = torch.stack([self.cross.image_transform(open_image(self.data.image_paths[i])) for i in imgs])
        self.image_passes += len(imgs)
        return self.cross.image_states(pixels.to(dev))

    def score(self, img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        """ITM "match" logits (float32 [P]) of pairs ``(img[p], txt[p])``, which must be sorted by image."""
        logits = np.empty(len(img), dtype=np.float32)
        if len(img) == 0:
            return logits
        states = self._ensure_texts(np.unique(txt))
        rows = np.asarray([self._text_rows[int(t)] for t in txt], dtype=np.int64)
        uniq, starts = np.unique(img, return_index=True)
        ends = np.append(starts[1:], len(img))
        with torch.inference_mode():
            for a in range(0, len(uniq), self.batch_size):
                chunk = [int(i) for i in uniq[a : a + self.batch_size]]
                istates = self._image_states(chunk)
                for j in range(len(chunk)):
                    lo, hi = int(starts[a + j]), int(ends[a + j])
                    one = istates.select([j])
                    for b in range(lo, hi, self.batch_size):
                        e = min(b + self.batch_size, hi)
                        out = self.cross.score(states.select(torch.from_numpy(rows[b:e])), one)
                        logits[b:e] = np.asarray(out.logit, dtype=np.float32).reshape(-1)
        return logits
