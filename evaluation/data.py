"""Evaluation data: a Karpathy-style split (read by :func:`alignfuse.data.karpathy.read_karpathy`) flattened as
ALBEF does, the truth function that judges captions against drawn objects, and image loading."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from alignfuse.data.karpathy import read_karpathy
from alignfuse.errors import InvalidInputError, NotFoundError, UnsupportedMediaError

from .metrics import PairTruth

#: ``truth(caption, objects)``: whether ``caption`` is true of an image whose drawn objects (the JSON dicts of
#: the split's ``objects``) are given; the built-in scenes' is :func:`alignfuse.data.scenes.caption_matches`
TruthFn = Callable[[str, Sequence[dict[str, Any]]], bool]


@dataclass(frozen=True)
class EvalData:
    """A Karpathy-style test split, flattened as ALBEF does: texts enumerated image by image, captions in order.

    ``images[i]`` is the path as written in the JSON, ``image_paths[i]`` the file under the image root."""

    source: str
    images: tuple[str, ...]
    image_paths: tuple[Path, ...]
    texts: tuple[str, ...]
    txt2img: tuple[int, ...]
    img2txt: tuple[tuple[int, ...], ...]
    groups: tuple[int | None, ...] | None = None
    #: per image, the drawn objects (the built-in scenes' JSON lists them): with a :data:`TruthFn`, group
    #: accuracy judges a pick by whether the caption is true of the picked image (see :meth:`pair_truth`)
    objects: tuple[tuple[dict[str, Any], ...], ...] | None = None

    def pair_truth(self, truth: TruthFn | None) -> PairTruth | None:
        """``truth`` lifted to indices: ``f(t, i)`` = text ``t`` is its image's caption or is true of image
        ``i``'s drawn objects (memoised). None without ``truth`` or when some image lists no objects."""
        if truth is None or self.objects is None:
            return None
        objects = self.objects
        cache: dict[tuple[int, int], bool] = {}

        def pair(t: int, i: int) -> bool:
            hit = cache.get((t, i))
            if hit is None:
                hit = cache[(t, i)] = self.txt2img[t] == i or truth(self.texts[t], objects[i])
            return hit

        return pair

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_texts(self) -> int:
        return len(self.texts)


def load_eval_data(
    karpathy_file: str | Path,
    image_root: str | Path | None = None,
    *,
    limit: int | None = None,
    split: str = "test",
) -> EvalData:
    """Read a Karpathy-style JSON (ALBEF's ``coco_test.json``/``flickr30k_test.json``, the scenes'
    ``scenes.json``, or Karpathy's original ``dataset_coco.json`` filtered to ``split``).

    ``image_root`` defaults to the JSON's folder. ``limit`` keeps the first N images (and their captions)."""
    path = Path(karpathy_file)
    if not path.is_file():
        raise NotFoundError(f"Karpathy file {path} does not exist")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be >= 1, got {limit}")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise NotFoundError(f"image root {root} is not a directory")
    entries = read_karpathy(path, split=split)
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise InvalidInputError(f"{path} holds no images (split {split!r})")
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[tuple[int, ...]] = []
    for i, e in enumerate(entries):
        ids = []
        for c in e.captions:
            ids.append(len(texts))
            texts.append(c)
            txt2img.append(i)
        img2txt.append(tuple(ids))
    has_group = any(e.group is not None for e in entries)
    has_objects = all(e.objects is not None for e in entries)
    return EvalData(
        source=str(path),
        images=tuple(e.image for e in entries),
        image_paths=tuple(root / e.image for e in entries),
        texts=tuple(texts),
        txt2img=tuple(txt2img),
        img2txt=tuple(img2txt),
        groups=tuple(e.group for e in entries) if has_group else None,
        objects=tuple(e.objects or () for e in entries) if has_objects else None,
    )


def open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise NotFoundError(f"image {path} does not exist (check --image-root)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedMediaError(f"cannot decode image {path}: {exc}") from exc


def pixel_batches(
    paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor], batch_size: int
) -> Iterator[torch.Tensor]:
    for a in range(0, len(paths), batch_size):
        yield torch.stack([transform(open_image(p)) for p in paths[a : a + batch_size]])
