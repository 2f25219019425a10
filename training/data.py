"""Training data: image-caption pairs held in memory (:class:`PairData`), read from a Karpathy-style JSON
(:func:`load_pairs`), and the image indices of every batch of an epoch (:func:`epoch_batches`).

When every entry of the JSON lists its drawn ``objects`` (the built-in synthetic scenes), the data also gets the
scenes' caption functions (:func:`attach_scene_functions`): ``matches`` (is a caption true of an image),
``perturb`` (a provably false caption, an ITM hard negative), ``attribute`` (a caption naming one attribute) and
``object_claim`` (a caption naming one drawn object, with its truth over all images).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alignfuse.data.karpathy import read_karpathy
from alignfuse.data.scenes import (
    COLOURS,
    SHAPES,
    SceneObject,
    attribute_caption,
    claim_holds,
    object_caption,
    parse_caption,
    perturb_caption,
)
from alignfuse.errors import InvalidInputError
from alignfuse.models.base import CLIP_MEAN, CLIP_STD
from alignfuse.training.options import TrainOptions

log = logging.getLogger(__name__)


@dataclass
class PairData:
    """Image-caption pairs held in memory.

    ``images``: uint8 [N, 3, R, R] (already at the model resolution); ``captions[k]`` describes image
    ``image_of[k]``; ``groups[i]`` (optional) the hard-negative group of image i; ``perturb(caption, image,
    rng)`` returns a caption that is false for the image (or None); ``matches(caption, image)`` whether a
    caption is true of an image (used to avoid false negatives and to score group accuracy).
    """

    images: torch.Tensor
    captions: list[str]
    image_of: list[int]
    groups: list[int] | None = None
    perturb: Callable[[str, int, np.random.Generator], str | None] | None = None
    matches: Callable[[str, int], bool] | None = None
    #: ``attribute(image, true, rng)``: a caption naming one attribute alone that is ``true`` or false of the
    #: image (extra ITM pairs that ground colours and shapes separately), or None
    attribute: Callable[[int, bool, np.random.Generator], str | None] | None = None
    #: ``object_claim(image, rng)``: a short caption naming one of the image's objects ("a red circle", "a
    #: circle", "a red shape") and its truth over *every* image of the data (bool [N]), for the object ITC
    object_claim: Callable[[int, np.random.Generator], tuple[str, torch.Tensor]] | None = None
    captions_of: list[list[int]] = field(default_factory=list)
    #: ``mates[i]``: images holding the same set of colours as image i but another set of shapes (only shapes
    #: tell them apart: in random batches that is ~2% of the pairs, so ITC never needs to read shape)
    mates: list[list[int]] | None = None
    #: share of "easy" perturbations (a word replaced by one absent from the image); set by the trainer
    perturb_easy: float = 0.0

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise InvalidInputError("PairData.images must be uint8 [N, 3, R, R]")
        if len(self.captions) != len(self.image_of):
            raise InvalidInputError("captions and image_of differ in length")
        if not self.captions_of:
            self.captions_of = [[] for _ in range(self.num_images)]
            for k, i in enumerate(self.image_of):
                self.captions_of[i].append(k)
        if any(not c for c in self.captions_of):
            raise InvalidInputError("every image needs at least one caption")

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def pixels(self, index: Sequence[int] | torch.Tensor) -> torch.Tensor:
        x = self.images[torch.as_tensor(index, dtype=torch.long)].float().div_(255.0)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def siblings(self, i: int) -> list[int]:
        if self.groups is None:
            return []
        g = self.groups[i]
        return [j for j in self._members().get(g, []) if j != i]

    def _members(self) -> dict[int, list[int]]:
        cached = getattr(self, "_members_cache", None)
        if cached is None:
            cached = {}
            for i, g in enumerate(self.groups or []):
                cached.setdefault(g, []).append(i)
            self._members_cache = cached
        return cached


# ---------------------------------------------------------------------------------------------- reading


def load_pairs(
    path: Path, image_root: Path | None, image_size: int, limit: int | None = None, *, split: str = "train"
) -> PairData:
    """Read a Karpathy-style JSON (:func:`alignfuse.data.karpathy.read_karpathy`: the ALBEF/BLIP list layout,
    or Karpathy's ``dataset_*.json`` filtered to ``split``) into memory at ``image_size`` (bicubic squash, as
    ALBEF); ``limit``: only the first N distinct images. Blank captions are dropped; unreadable records and
    images are skipped with a warning. When *every* image has a ``group``, those are the hard-negative groups;
    when every image lists its ``objects`` (the synthetic scenes), the scenes' caption functions are attached.

    Raises NotFoundError (no file), CorruptDataError (not JSON, or neither layout), InvalidInputError (no
    readable image-caption pair)."""

    def bad_record(where: str, what: str) -> None:
        log.warning("skipping %s: %s", where, what)

    records = read_karpathy(path, split=split, on_problem=bad_record)[: limit or None]
    root = image_root or path.parent
    images: list[torch.Tensor] = []
    captions: list[str] = []
    image_of: list[int] = []
    groups: list[int | None] = []
    objects: list[tuple[dict[str, Any], ...] | None] = []
    skipped = 0
    for rec in records:
        try:
            with Image.open(root / rec.image) as im:
                rgb = im.convert("RGB")
                if rgb.size != (image_size, image_size):
                    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
                arr = np.asarray(rgb, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable image %s: %s", root / rec.image, exc)
            skipped += 1
            continue
        caps = [c for c in rec.captions if c.strip()]
        if not caps:
            continue
        i = len(images)
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        for c in caps:
            captions.append(c)
            image_of.append(i)
        groups.append(rec.group)
        objects.append(rec.objects)
    if not images:
        raise InvalidInputError(f"{path}: no readable image-caption pairs")
    if skipped:
        log.warning("%d unreadable images skipped", skipped)
    data = PairData(
        torch.stack(images),
        captions,
        image_of,
        groups=[g for g in groups if g is not None] if all(g is not None for g in groups) else None,
    )
    if all(o is not None for o in objects):
        attach_scene_functions(data, [o for o in objects if o is not None])
    return data


def colour_mates(scene_objs: Sequence[Sequence[SceneObject]]) -> list[list[int]]:
    """For each image, the images with the same set of colours and a different set of shapes."""
    colours = [frozenset(o.colour for o in objs) for objs in scene_objs]
    shapes = [frozenset(o.shape for o in objs) for objs in scene_objs]
    by_colours: dict[frozenset[str], list[int]] = {}
    for i, c in enumerate(colours):
        by_colours.setdefault(c, []).append(i)
    return [[j for j in by_colours[colours[i]] if shapes[j] != shapes[i]] for i in range(len(scene_objs))]


def attach_scene_functions(data: PairData, objects: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Give ``data`` the scenes' ``matches``, ``perturb``, ``attribute`` and ``object_claim`` from each image's
    drawn objects."""
    scene_objs = [[SceneObject(**o) for o in objs] for objs in objects]
    # (colour, shape) pairs the training images contain; perturbed negatives never mention any other pair
    seen_pairs = frozenset((o.colour, o.shape) for objs in scene_objs for o in objs)
    parse = functools.lru_cache(maxsize=200_000)(parse_caption)

    def matches(caption: str, image: int) -> bool:
        return claim_holds(parse(caption), scene_objs[image])

    def perturb(caption: str, image: int, rng: np.random.Generator) -> str | None:
        return perturb_caption(
            caption, scene_objs[image], rng, easy=data.perturb_easy, allowed_pairs=seen_pairs
        )

    def attribute(image: int, true: bool, rng: np.random.Generator) -> str | None:
        return attribute_caption(scene_objs[image], rng, true=true)

    # per image: which colour-shape pairs / colours / shapes it holds (columns of object_claim's truth)
    cix = {c: k for k, c in enumerate(COLOURS)}
    six = {sh: k for k, sh in enumerate(SHAPES)}
    pair_table = torch.zeros(len(COLOURS), len(SHAPES), len(scene_objs), dtype=torch.bool)
    for i, objs in enumerate(scene_objs):
        for o in objs:
            pair_table[cix[o.colour], six[o.shape], i] = True
    colour_table = pair_table.any(dim=1)
    shape_table = pair_table.any(dim=0)

    def object_claim(image: int, rng: np.random.Generator) -> tuple[str, torch.Tensor]:
        text, colour, shape = object_caption(scene_objs[image], rng)
        if colour is not None and shape is not None:
            return text, pair_table[cix[colour], six[shape]]
        if shape is not None:
            return text, shape_table[six[shape]]
        assert colour is not None
        return text, colour_table[cix[colour]]

    data.mates = colour_mates(scene_objs)
    data.object_claim = object_claim

    data.matches = matches
    data.perturb = perturb
    data.attribute = attribute


# ---------------------------------------------------------------------------------------------- batches


def epoch_batches(data: PairData, opts: TrainOptions, epoch: int) -> list[list[int]]:
    """The image indices of every batch of ``epoch`` (deterministic from seed and epoch).

    A share ``group_mix`` of each batch are group siblings of the fresh images (same bag of attributes, other
    binding) and a share ``mate_mix`` their colour mates (same colours, other shapes), from the epochs where each
    is switched on; the rest are fresh images in a random order."""
    rng = np.random.default_rng([opts.seed, epoch, 17])
    order = [int(i) for i in rng.permutation(data.num_images)]
    mix = opts.group_mix if (data.groups is not None and epoch >= opts.group_mix_after) else 0.0
    mate = opts.mate_mix if (data.mates is not None and epoch >= opts.mate_mix_after) else 0.0
    b = opts.batch_size
    n_fresh = max(1, round(b * (1.0 - mix - mate)))
    mates = data.mates or []
    fills: list[tuple[Callable[[int], list[int]], int]] = []
    if mix > 0:
        fills.append((data.siblings, round(b * mix)))
    if mate > 0:
        fills.append((lambda i: mates[i], b))
    batches = []
    pos = 0
    while pos < len(order):
        batch = order[pos : pos + n_fresh]
        pos += n_fresh
        fresh = len(batch)
        for pool, want in fills:
            added = 0
            for k in range(fresh):
                if len(batch) >= b or added >= want:
                    break
                cand = pool(batch[k])
                if cand:
                    batch.append(cand[int(rng.integers(0, len(cand)))])
                    added += 1
        if len(batch) >= 2:
            batches.append(batch)
    return batches


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of one optimizer step (caption choice, perturbations): same seed and step, same draws."""
    return np.random.default_rng([seed, step, 29])
