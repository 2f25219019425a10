"""The world of the scenes: colours, shapes, sizes, relations, the objects and scene specs, the held-out
(colour, shape) pairs of the compositional split, and the sampling of scene groups (hard negatives)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from alignfuse.errors import InvalidInputError

Split = Literal["train", "val", "test", "compositional"]
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "compositional": 3}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 190),
    "orange": (250, 135, 15),
    "pink": (255, 120, 205),
    "cyan": (30, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PLURAL = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
_SINGULAR = {v: k for k, v in _PLURAL.items()}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}

# (colour, shape) pairs that never occur in train/val/test; the compositional split is built from them.
# One pair per colour, each shape held out at most twice.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "star"),
        ("blue", "diamond"),
        ("yellow", "cross"),
        ("purple", "circle"),
        ("orange", "square"),
        ("pink", "star"),
        ("cyan", "triangle"),
    }
)

# radius of an object as a fraction of the image side
_RADIUS = {"small": 0.14, "large": 0.2}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``x``/``y``/``r`` are fractions of the image side (centre and radius)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to draw one image (``render_scene``) and to caption it (``caption_scene``)."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]  # base grey-ish colour of the texture
    texture_seed: int
    group: int = 0


# ---------------------------------------------------------------------------------------------- relations


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether ``a <relation> b`` is clearly true: the offset is mostly along the relation's axis."""
    dx, dy = b.x - a.x, b.y - a.y  # image y grows downwards
    if relation in ("left of", "right of"):
        if abs(dx) <= abs(dy) or abs(dx) < 0.15:
            return False
        return dx > 0 if relation == "left of" else dx < 0
    if relation in ("above", "below"):
        if abs(dy) <= abs(dx) or abs(dy) < 0.15:
            return False
        return dy > 0 if relation == "above" else dy < 0
    raise InvalidInputError(f"unknown relation {relation!r}")


def relation_between(a: SceneObject, b: SceneObject) -> str | None:
    for rel in RELATIONS:
        if relation_holds(a, b, rel):
            return rel
    return None


# ---------------------------------------------------------------------------------------------- sampling


def _allowed(colour: str, shape: str, split: str) -> bool:
    held = (colour, shape) in HELD_OUT_PAIRS
    return held if split == "compositional" else not held


def _place(
    rng: np.random.Generator, radii: Sequence[float], relation: str | None
) -> list[tuple[float, float]] | None:
    """Non-overlapping centres; when ``relation`` is given the first two objects satisfy it. None when 500
    random tries fail (the caller then shrinks the objects)."""
    for _ in range(500):
        pts: list[tuple[float, float]] = []
        if relation is not None:
            r0, r1 = radii[0], radii[1]
            horizontal = relation in ("left of", "right of")
            # along-axis positions: first object in the first part, second in the second part
            lo0, hi0 = r0 + 0.02, 0.5 - 0.04
            lo1, hi1 = 0.5 + 0.04, 1 - r1 - 0.02
            along0 = float(rng.uniform(lo0, max(lo0, hi0)))
            along1 = float(rng.uniform(min(lo1, hi1), hi1))
            if relation in ("right of", "below"):
                along0, along1 = 1 - along0, 1 - along1
            # across-axis: near each other so the relation is unambiguous
            across0 = float(rng.uniform(max(r0, r1) + 0.03, 1 - max(r0, r1) - 0.03))
            across1 = float(np.clip(across0 + rng.uniform(-0.12, 0.12), r1 + 0.02, 1 - r1 - 0.02))
            if horizontal:
                pts = [(along0, across0), (along1, across1)]
            else:
                pts = [(across0, along0), (across1, along1)]
        for r in radii[len(pts) :]:
            pts.append(
                (float(rng.uniform(r + 0.02, 1 - r - 0.02)), float(rng.uniform(r + 0.02, 1 - r - 0.02)))
            )
        ok = all(
            math.hypot(pts[i][0] - pts[j][0], pts[i][1] - pts[j][1]) > radii[i] + radii[j] + 0.04
            for i in range(len(pts))
            for j in range(i)
        )
        if ok and relation is not None:
            a = SceneObject("circle", "red", "small", pts[0][0], pts[0][1], radii[0])
            b = SceneObject("circle", "red", "small", pts[1][0], pts[1][1], radii[1])
            ok = relation_holds(a, b, relation)
        if ok:
            return pts
    return None


def _background(rng: np.random.Generator) -> tuple[tuple[int, int, int], int]:
    level = int(rng.integers(95, 165))
    tint = rng.integers(-12, 13, size=3)
    base = tuple(int(np.clip(level + t, 0, 255)) for t in tint)
    return (base[0], base[1], base[2]), int(rng.integers(0, 2**31 - 1))


def _objects(
    rng: np.random.Generator,
    attrs: Sequence[tuple[str, str, str]],
    relation: str | None,
) -> tuple[SceneObject, ...]:
    radii = [_RADIUS[size] * float(rng.uniform(0.92, 1.08)) for _, _, size in attrs]
    pts = _place(rng, radii, relation)
    while pts is None:  # crowded (three large objects): shrink everything a little and retry
        radii = [r * 0.9 for r in radii]
        pts = _place(rng, radii, relation)
    return tuple(
        SceneObject(shape, colour, size, round(x, 4), round(y, 4), round(r, 4))
        for (shape, colour, size), (x, y), r in zip(attrs, pts, radii, strict=True)
    )


def _pick_pair(rng: np.random.Generator, split: str, *, need_swap_ok: bool) -> list[tuple[str, str]] | None:
    colours = list(COLOURS)
    for _ in range(200):
        c0, c1 = rng.choice(len(colours), size=2, replace=False)
        s0, s1 = rng.choice(len(SHAPES), size=2, replace=False)
        a, b = (colours[c0], SHAPES[s0]), (colours[c1], SHAPES[s1])
        swapped = [(a[0], b[1]), (b[0], a[1])]
        if split == "compositional":
            # every binding must contain a held-out pair; the swapped binding must too (else drop it later)
            if not (_allowed(*a, split) or _allowed(*b, split)):
                continue
            return [a, b]
        if not (_allowed(*a, split) and _allowed(*b, split)):
            continue
        if need_swap_ok and not all(_allowed(*p, split) for p in swapped):
            continue
        return [a, b]
    return None


def _has_held_out(objs: Sequence[SceneObject]) -> bool:
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objs)


def _valid_for_split(objs: Sequence[SceneObject], split: str) -> bool:
    if split == "compositional":
        return _has_held_out(objs)
    return not _has_held_out(objs)


def sample_group(rng: np.random.Generator, split: str = "train", group: int = 0) -> list[SceneSpec]:
    """One group of scenes sharing a bag of attributes (1-4 scenes).

    Kinds (by probability): two objects with a relation (60%: the 4 scenes of 2 bindings x 2 orders), three
    objects (20%: two relations' worth of arrangements), a count scene "two X and a Y" (10%: X/Y colours
    swapped), a single object (10%: its colour swapped with a second colour).
    """
    if split not in _SPLIT_CODE:
        raise InvalidInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    kind = rng.choice(4, p=[0.6, 0.2, 0.1, 0.1])
    scenes: list[list[SceneObject]] = []
    colours = list(COLOURS)
    if kind == 0:  # two objects: bindings x orders
        pair = _pick_pair(rng, split, need_swap_ok=True)
        if pair is None:
            return []
        (c0, s0), (c1, s1) = pair
        z0, z1 = (SIZES[int(i)] for i in rng.integers(0, 2, size=2))
        rel = RELATIONS[int(rng.integers(0, 4))]
        for binding in ([(s0, c0, z0), (s1, c1, z1)], [(s1, c0, z0), (s0, c1, z1)]):
            for order in (0, 1):
                attrs = binding if order == 0 else binding[::-1]
                scenes.append(list(_objects(rng, attrs, rel)))
    elif kind == 1:  # three distinct objects, arranged differently
        pair = _pick_pair(rng, split, need_swap_ok=False)
        if pair is None:
            return []
        third = None
        for _ in range(100):
            c = colours[int(rng.integers(0, len(colours)))]
            s = SHAPES[int(rng.integers(0, len(SHAPES)))]
            if (c, s) not in pair and (split == "compositional" or _allowed(c, s, split)):
                third = (c, s)
                break
        if third is None:
            return []
        items = [(s, c, SIZES[int(rng.integers(0, 2))]) for c, s in [*pair, third]]
        rel = RELATIONS[int(rng.integers(0, 4))]
        perms = [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1)]
        for p in perms:
            scenes.append(list(_objects(rng, [items[i] for i in p], rel)))
    elif kind == 2:  # counts: two X and a Y, then colours swapped
        pair = _pick_pair(rng, split, need_swap_ok=True)
        if pair is None:
            return []
        (c0, s0), (c1, s1) = pair
        z = SIZES[int(rng.integers(0, 2))]
        for (ca, sa), (cb, sb) in (((c0, s0), (c1, s1)), ((c1, s0), (c0, s1))):
            attrs = [(sa, ca, z), (sa, ca, z), (sb, cb, "small" if z == "large" else "large")]
            objs = list(_objects(rng, attrs, None))
            perm = rng.permutation(3)
            scenes.append([objs[int(i)] for i in perm])
    else:  # single object; the group partner has another colour
        for _ in range(100):
            c0, c1 = (colours[int(i)] for i in rng.choice(len(colours), size=2, replace=False))
            s = SHAPES[int(rng.integers(0, len(SHAPES)))]
            if split == "compositional" or (_allowed(c0, s, split) and _allowed(c1, s, split)):
                break
        z = SIZES[int(rng.integers(0, 2))]
        for c in (c0, c1):
            scenes.append(list(_objects(rng, [(s, c, z)], None)))
    out = []
    for objs in scenes:
        if not _valid_for_split(objs, split):
            continue
        bg, tex = _background(rng)
        out.append(SceneSpec(tuple(objs), bg, tex, group))
    return out


def sample_scene(rng: np.random.Generator, split: str = "train", group: int = 0) -> SceneSpec:
    """One random scene (the first of a freshly sampled group)."""
    while True:
        scenes = sample_group(rng, split, group)
        if scenes:
            return scenes[0]
