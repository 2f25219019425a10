"""The pointing game: does the cross-encoder look at the object a phrase names?

For each (caption, object) case, the grounding heatmaps of the phrase's words (the object's colour and shape
words, summed) are computed with the caption against the image (:class:`~alignfuse.models.base.Grounding`);
the case is a *hit* when the heatmap's peak cell (its centre) falls inside the object's box. The baseline a
random point would reach is the box's area as a fraction of the image (``chance``); a second baseline
always points at the image centre (``centre``).

Cases come from any Karpathy-style split whose images list their drawn objects with positions (the built-in
scenes' JSON: ``objects: [{"colour", "shape", "x", "y", "r"}]``, fractions of the image side): a caption
yields one case per object whose "colour shape" phrase it contains and that no other object of the image
shares.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.models.base import Grounding, GroundingModel, ImageTransform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointingCase:
    """One phrase of one caption and the box of the object it names (fractions: x0, y0, x1, y1)."""

    image: Path
    text: str
    phrase: tuple[str, ...]
    box: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class PointingResult:
    """Pointing-game accuracy at one fusion layer, with its baselines."""

    layer: int
    cases: int
    hits: int
    accuracy: float
    chance: float  # mean box area: what a uniformly random point scores
    centre: float  # accuracy of always pointing at the image centre
    empty: int  # cases whose phrase heatmap was all zero (counted as misses)
    skipped: int  # phrases not found among the grounding's words (tokenisation), not counted
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("ss", "x", "sh", "ch")) else "s")


def object_box(obj: dict[str, Any]) -> tuple[float, float, float, float]:
    """An object's box from its centre and radius (fractions of the image side), clipped to the image."""
    x, y, r = float(obj["x"]), float(obj["y"]), float(obj["r"])
    return (max(0.0, x - r), max(0.0, y - r), min(1.0, x + r), min(1.0, y + r))


def pointing_cases(karpathy: str | Path, image_root: str | Path | None = None) -> list[PointingCase]:
    """Cases of a split whose entries list ``objects`` with colour, shape and position (see module doc)."""
    path = Path(karpathy)
    if not path.is_file():
        raise NotFoundError(f"split not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise InvalidInputError(f"{path}: expected a Karpathy-style list of images")
    cases: list[PointingCase] = []
    for entry in entries:
        objects = entry.get("objects")
        if not objects or not all({"colour", "shape", "x", "y", "r"} <= set(o) for o in objects):
            continue
        captions = entry.get("caption", [])
        captions = [captions] if isinstance(captions, str) else list(captions)
        names = [(o["colour"], o["shape"]) for o in objects]
        for caption in captions:
            words = caption.lower().replace(",", " ").replace(".", " ").split()
            bigrams = set(zip(words, words[1:], strict=False))
            for obj, name in zip(objects, names, strict=True):
                if names.count(name) != 1:
                    continue  # two objects share the phrase: its referent is ambiguous
                colour, shape = name
                for form in (shape, _plural(shape)):
                    if (colour, form) in bigrams:
                        cases.append(
                            PointingCase(root / entry["image"], caption, (colour, form), object_box(obj))
                        )
                        break
    if not cases:
        raise InvalidInputError(
            f"{path}: no pointing-game cases (the split's images must list objects with colour, shape, x, y, r "
            "and captions naming them, as the built-in scenes do)"
        )
    return cases


def phrase_heatmap(g: Grounding, phrase: Sequence[str]) -> np.ndarray | None:
    """The summed heatmaps of the first run of ``g.words`` equal to ``phrase``, or None when absent."""
    n = len(phrase)
    for start in range(len(g.words) - n + 1):
        if tuple(g.words[start : start + n]) == tuple(phrase):
            return np.asarray(g.heatmaps[start : start + n].sum(axis=0), dtype=np.float32)
    return None


def peak_point(heatmap: np.ndarray) -> tuple[float, float]:
    """The centre of the heatmap's peak cell as image fractions (x, y)."""
    rows, cols = heatmap.shape
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (float(c) + 0.5) / cols, (float(r) + 0.5) / rows


def _inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def pointing_game(
    model: GroundingModel,
    transform: ImageTransform,
    cases: Sequence[PointingCase],
    *,
    layer: int | None = None,
) -> PointingResult:
    """Run the pointing game of ``cases`` with ``model``'s grounding at fusion layer ``layer``."""
    if not cases:
        raise InvalidInputError("the pointing game needs at least one case")
    t0 = time.perf_counter()
    hits = empty = skipped = centre = 0
    areas: list[float] = []
    used_layer = -1
    pixels: dict[Path, torch.Tensor] = {}
    groundings: dict[tuple[Path, str], Grounding] = {}
    for case in cases:
        px = pixels.get(case.image)
        if px is None:
            with Image.open(case.image) as im:
                px = pixels[case.image] = transform(im.convert("RGB")).unsqueeze(0)
        key = (case.image, case.text)
        g = groundings.get(key)
        if g is None:
            if len(groundings) > 64:
                groundings.clear()
            g = groundings[key] = model.grounding(case.text, px, layer=layer)
        used_layer = g.layer
        heat = phrase_heatmap(g, case.phrase)
        if heat is None:
            skipped += 1
            continue
        areas.append(case.area)
        centre += _inside((0.5, 0.5), case.box)
        if not float(heat.max()) > 0.0:
            empty += 1
            continue
        hits += _inside(peak_point(heat), case.box)
    n = len(areas)
    if n == 0:
        raise InvalidInputError("no case's phrase was found among the grounding's words")
    return PointingResult(
        layer=used_layer,
        cases=n,
        hits=hits,
        accuracy=hits / n,
        chance=float(np.mean(areas)),
        centre=centre / n,
        empty=empty,
        skipped=skipped,
        seconds=round(time.perf_counter() - t0, 3),
    )
