"""The built-in synthetic scenes world: coloured shapes with spatial relations and counts.

Every image holds 1-3 objects (a shape, one of :data:`COLOURS`, small or large) on a noisy, low-saturation
textured background, and comes with 5 captions drawn from varied templates (attributes, spatial relations,
counts). Scenes are generated in *groups* that share one bag of words (the same colours, shapes and sizes) but
bind them differently or arrange them differently, so a gallery is full of hard negatives that a bag-of-words
matcher cannot separate: "a red circle left of a blue square" / "a blue circle left of a red square" /
"a blue square left of a red circle" / ...

Everything is a pure function of ``(seed, split)``: the same arguments give byte-identical PNGs and JSON.
The ``compositional`` split only uses the held-out (colour, shape) pairs of :data:`HELD_OUT_PAIRS`, which the
``train``/``val``/``test`` splits never draw.

On disk (``generate_scenes``): ``OUT/images/000001.png ...`` and ``OUT/scenes.json``, a Karpathy-style list
``[{"image": "images/000001.png", "caption": [5 strings], "group": g, "objects": [...]}]`` that any Karpathy
source reads, plus ``OUT/scenes_meta.json`` (seed, split, count, size, generator version).

Captions also parse back into *claims* (:func:`parse_caption`) that can be checked against a scene
(:func:`caption_matches`); :func:`perturb_caption` swaps colour or shape words or the relation to make a
caption that is provably false for the scene (a hard negative for image-text matching).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from alignfuse.errors import InvalidInputError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1

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


# ---------------------------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * 0.15 + r * math.sin(math.radians(a)))
            for a in (-90, 30, 150)
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise InvalidInputError(f"unknown shape {shape!r}")


def render_scene(spec: SceneSpec, size: int = 96) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``size`` x ``size`` pixels. Pure: same spec, same pixels."""
    if size < 32:
        raise InvalidInputError(f"scene size must be >= 32 pixels, got {size}")
    rng = np.random.default_rng(spec.texture_seed)
    # texture: a smooth low-frequency field (bilinear upsampled 4x4 grid) plus per-pixel noise, low saturation
    coarse = rng.normal(0.0, 14.0, size=(4, 4, 1)).astype(np.float32)
    field = (
        np.asarray(
            Image.fromarray(((coarse[:, :, 0] + 128).clip(0, 255)).astype(np.uint8)).resize(
                (size, size), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )[:, :, None]
        - 128.0
    )
    noise = rng.normal(0.0, 9.0, size=(size, size, 1)).astype(np.float32)
    chroma = rng.normal(0.0, 3.0, size=(size, size, 3)).astype(np.float32)
    bg = np.asarray(spec.background, dtype=np.float32)[None, None, :] + field + noise + chroma
    canvas = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "RGB")
    # objects: drawn at 4x and downsampled for clean anti-aliased edges
    ss = 4
    big = canvas.resize((size * ss, size * ss), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    side = size * ss
    for obj in spec.objects:
        cx, cy, r = obj.x * side, obj.y * side, obj.r * side
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    return big.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fix_articles(text: str) -> str:
    """Make every indefinite article agree with the next word ("a orange" -> "an orange")."""
    words = text.split()
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = _article(words[i + 1])
    return " ".join(words)


def _phrase(obj: SceneObject, *, with_size: bool) -> str:
    words = [obj.size] if with_size else []
    words += [obj.colour, obj.shape]
    return _article(words[0]) + " " + " ".join(words)


def _count_phrase(n: int, obj: SceneObject, with_size: bool) -> str:
    if n == 1:
        return _phrase(obj, with_size=with_size)
    words = [_NUMBER_WORDS[n]] + ([obj.size] if with_size else []) + [obj.colour, _PLURAL[obj.shape]]
    return " ".join(words)


def _rel_text(rng: np.random.Generator, rel: str) -> str:
    if rel in ("left of", "right of") and rng.random() < 0.5:
        return "to the " + rel
    return rel


_PREFIXES = ("", "", "", "a picture of ", "an image of ", "there is ")


def caption_scene(spec: SceneSpec, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct true captions of ``spec`` from varied templates."""
    objs = spec.objects
    cands: list[str] = []

    def pre(text: str) -> str:
        p = _PREFIXES[int(rng.integers(0, len(_PREFIXES)))]
        if p == "there is " and not text.startswith(("a ", "an ")):
            p = "there are "
        return p + text

    # group identical objects (counts)
    kinds: dict[tuple[str, str], list[SceneObject]] = {}
    for o in objs:
        kinds.setdefault((o.colour, o.shape), []).append(o)
    if len(objs) == 1:
        o = objs[0]
        cands += [
            pre(_phrase(o, with_size=True)),
            pre(_phrase(o, with_size=False)),
            f"one {o.colour} {o.shape}",
            f"a single {o.size} {o.colour} {o.shape}",
            f"a {o.colour} {o.shape} on a textured background",
            f"one {o.size} {o.colour} {o.shape}",
            f"a {o.size} {o.shape} that is {o.colour}",
        ]
    elif len(kinds) < len(objs):  # a count scene
        parts = sorted(kinds.values(), key=lambda v: -len(v))
        many, single = parts[0], parts[1][0] if len(parts) > 1 else None
        cands.append(pre(_count_phrase(len(many), many[0], with_size=False)))
        cands.append(_count_phrase(len(many), many[0], with_size=True))
        if single is not None:
            cands += [
                pre(_count_phrase(len(many), many[0], False) + " and " + _phrase(single, with_size=False)),
                _phrase(single, with_size=False) + " and " + _count_phrase(len(many), many[0], False),
                _count_phrase(len(many), many[0], True) + " and " + _phrase(single, with_size=True),
                f"{_NUMBER_WORDS[len(objs)]} shapes: " + _count_phrase(len(many), many[0], False) + " and "
                + _phrase(single, with_size=False),
            ]  # fmt: skip
    else:  # 2 or 3 distinct objects: relations between consecutive objects (strong), attribute lists (weak)
        strong: list[str] = []
        for i in range(len(objs) - 1):
            a, b = objs[i], objs[i + 1]
            rel = relation_between(a, b)
            if rel is None:
                continue
            ws = bool(rng.random() < 0.4)
            strong.append(pre(f"{_phrase(a, with_size=ws)} {_rel_text(rng, rel)} {_phrase(b, with_size=ws)}"))
            strong.append(
                f"{_phrase(b, with_size=False)} {_rel_text(rng, _INVERSE[rel])} {_phrase(a, with_size=False)}"
            )
            strong.append(
                f"{_phrase(a, with_size=True)} is {_rel_text(rng, rel)} {_phrase(b, with_size=True)}"
            )
            strong.append(
                f"{_phrase(b, with_size=True)} is {_rel_text(rng, _INVERSE[rel])} {_phrase(a, with_size=True)}"
            )
        listed = " and ".join(_phrase(o, with_size=False) for o in objs)
        if len(objs) == 3:
            listed = (
                ", ".join(_phrase(o, with_size=False) for o in objs[:2])
                + " and "
                + _phrase(objs[2], with_size=False)
            )
        weak = [pre(listed), " and ".join(_phrase(o, with_size=True) for o in reversed(objs))]
        weak.append(f"{_NUMBER_WORDS[len(objs)]} shapes: " + listed)
        strong = _dedupe(strong)
        picks = [strong[int(i)] for i in rng.permutation(len(strong))[: n - 1]]
        picks.append(weak[int(rng.integers(0, len(weak)))])
        cands = picks
    uniq = _dedupe(cands)
    idx = rng.permutation(len(uniq))
    out = [uniq[int(i)] for i in idx[:n]]
    while len(out) < n:
        out.append(uniq[int(rng.integers(0, len(uniq)))])
    return out


def _dedupe(texts: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for c in texts:
        seen.setdefault(" ".join(c.split()), None)
    return list(seen)


# ---------------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Mention:
    count: int
    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Claim:
    """What a caption asserts: the mentioned objects (with counts) and optionally a relation of the first
    mention to the second."""

    mentions: tuple[Mention, ...]
    relation: str | None = None
    total: int | None = None  # "three shapes: ..."
    #: attribute claims ("a red shape", "a triangle"): some object has this colour and/or this shape
    attributes: tuple[tuple[str | None, str | None], ...] = ()


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(sorted([*SHAPES, *_PLURAL.values()], key=len, reverse=True))
_MENTION_RE = re.compile(
    rf"\b(a|an|one|two|three)\s+(?:(?:single)\s+)?(?:(small|large)\s+)?(?:({_COLOUR_RE})\s+)?"
    rf"(?:(small|large)\s+)?({_SHAPE_RE})\b(?:\s+that\s+is\s+({_COLOUR_RE}))?"
)
_REL_RE = re.compile(r"\b(left of|right of|above|below)\b")
_ATTR_COLOUR_RE = re.compile(rf"^(?:a|an) ({_COLOUR_RE}) (?:shape|object|thing)$|^something ({_COLOUR_RE})$")
_ATTR_SHAPE_RE = re.compile(rf"^(?:a|an) ({'|'.join(SHAPES)})$")
_ATTR_PREFIX_RE = re.compile(r"^(?:a picture of |an image of |there is )")


def parse_caption(caption: str) -> Claim:
    """Parse a caption of the scenes grammar into a :class:`Claim` (mentions in order, first relation)."""
    text = " ".join(caption.lower().replace(",", " ").replace(":", " ").split())
    mentions = []
    spans = []
    for m in _MENTION_RE.finditer(text):
        num, size0, colour, size1, shape, colour2 = m.groups()
        if num == "three" and shape == "shapes" or shape in ("shape", "shapes"):
            continue
        if text[m.end() : m.end() + 7] == " shapes":
            continue
        colour = colour or colour2
        if colour is None:
            continue
        mentions.append(Mention(_WORD_NUMBERS[num], colour, _SINGULAR.get(shape, shape), size0 or size1))
        spans.append(m.span())
    relation = None
    if len(spans) >= 2:
        between = text[spans[0][1] : spans[1][0]]
        rm = _REL_RE.search(between)
        relation = rm.group(1) if rm else None
    total = None
    tm = re.search(r"\b(one|two|three) shapes\b", text)
    if tm:
        total = _WORD_NUMBERS[tm.group(1)]
    attributes: tuple[tuple[str | None, str | None], ...] = ()
    if not mentions:
        bare = _ATTR_PREFIX_RE.sub("", text)
        cm, sm = _ATTR_COLOUR_RE.match(bare), _ATTR_SHAPE_RE.match(bare)
        if cm:
            attributes = ((cm.group(1) or cm.group(2), None),)
        elif sm:
            attributes = ((None, sm.group(1)),)
    return Claim(tuple(mentions), relation, total, attributes)


def _matching(objs: Sequence[SceneObject], m: Mention) -> list[SceneObject]:
    return [
        o
        for o in objs
        if o.colour == m.colour and o.shape == m.shape and (m.size is None or o.size == m.size)
    ]


def claim_holds(claim: Claim, objects: Sequence[SceneObject]) -> bool:
    """Whether every mention is present with its exact count and the relation holds between them (and
    every attribute claim is true of some object)."""
    if claim.attributes:
        return all(
            any((c is None or o.colour == c) and (s is None or o.shape == s) for o in objects)
            for c, s in claim.attributes
        )
    if not claim.mentions:
        return False
    if claim.total is not None and claim.total != len(objects):
        return False
    for m in claim.mentions:
        same_kind = [o for o in objects if o.colour == m.colour and o.shape == m.shape]
        if len(same_kind) != m.count or len(_matching(objects, m)) != m.count:
            return False
    if claim.relation is not None:
        a_set, b_set = _matching(objects, claim.mentions[0]), _matching(objects, claim.mentions[1])
        if not any(relation_holds(a, b, claim.relation) for a in a_set for b in b_set if a is not b):
            return False
    return True


def caption_matches(caption: str, objects: Sequence[SceneObject | dict]) -> bool:
    """Whether ``caption`` is true of a scene given as objects (or their JSON dicts)."""
    objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in objects]
    return claim_holds(parse_caption(caption), objs)


def _swap_words(words: list[str], vocab: set[str], rng: np.random.Generator) -> list[str] | None:
    pos = [i for i, w in enumerate(words) if w in vocab]
    distinct = {words[i] for i in pos}
    if len(distinct) < 2:
        return None
    i, j = rng.choice(pos, size=2, replace=False)
    for _ in range(6):
        if words[int(i)] != words[int(j)]:
            break
        i, j = rng.choice(pos, size=2, replace=False)
    if words[int(i)] == words[int(j)]:
        return None
    out = list(words)
    out[int(i)], out[int(j)] = out[int(j)], out[int(i)]
    return out


def perturb_caption(
    caption: str,
    objects: Sequence[SceneObject | dict],
    rng: np.random.Generator,
    tries: int = 12,
    easy: float = 0.0,
    allowed_pairs: Collection[tuple[str, str]] | None = None,
) -> str | None:
    """A minimally edited caption that is *false* for the scene: two colour words swapped, two shape words
    swapped, the relation reversed, or a colour/shape word replaced (preferably by one that occurs in the
    scene). With probability ``easy`` the edit is instead the easiest kind: a colour or shape word replaced
    by one that does not occur in the scene at all (presence, not binding; a curriculum for training).

    ``allowed_pairs`` (for training data): only captions whose every (colour, shape) mention is in it are
    returned. A pair that never occurs in the training images must not occur only in negatives either,
    or the model learns "this pair never matches" and rejects it on the compositional split.
    ``None`` when no such edit is found."""
    objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in objects]
    words = caption.split()
    colours, shapes = set(COLOURS), set(SHAPES) | set(_PLURAL.values())
    scene_colours = sorted({o.colour for o in objs})
    scene_shapes = sorted({o.shape for o in objs})
    absent = easy > 0 and rng.random() < easy
    for _ in range(tries):
        op = int(rng.integers(3, 5)) if absent else int(rng.integers(0, 5))
        new: list[str] | None = None
        if op == 0:
            new = _swap_words(words, colours, rng)
        elif op == 1:
            # swap shapes keeping each slot's number (plural stays plural)
            pos = [i for i, w in enumerate(words) if w in shapes]
            if len({_SINGULAR.get(words[i], words[i]) for i in pos}) >= 2:
                i, j = (int(k) for k in rng.choice(pos, size=2, replace=False))
                si, sj = _SINGULAR.get(words[i], words[i]), _SINGULAR.get(words[j], words[j])
                new = list(words)
                new[i] = _PLURAL[sj] if words[i] in _SINGULAR else sj
                new[j] = _PLURAL[si] if words[j] in _SINGULAR else si
        elif op == 2:
            text = " ".join(words)
            rm = _REL_RE.search(text)
            if rm:
                new = (text[: rm.start()] + _INVERSE[rm.group(1)] + text[rm.end() :]).split()
        elif op == 3:
            pos = [i for i, w in enumerate(words) if w in colours]
            if pos:
                i = int(rng.choice(pos))
                if absent:
                    pool = [c for c in COLOURS if c not in scene_colours]
                else:
                    pool = [c for c in scene_colours if c != words[i]] if rng.random() < 0.6 else []
                pool = pool or [c for c in COLOURS if c != words[i]]
                new = list(words)
                new[i] = pool[int(rng.integers(0, len(pool)))]
        else:
            pos = [i for i, w in enumerate(words) if w in shapes]
            if pos:
                i = int(rng.choice(pos))
                cur = _SINGULAR.get(words[i], words[i])
                if absent:
                    pool = [s for s in SHAPES if s not in scene_shapes]
                else:
                    pool = [s for s in scene_shapes if s != cur] if rng.random() < 0.6 else []
                pool = pool or [s for s in SHAPES if s != cur]
                s = pool[int(rng.integers(0, len(pool)))]
                new = list(words)
                new[i] = _PLURAL[s] if words[i] in _SINGULAR else s
        if new is None:
            continue
        cand = fix_articles(" ".join(new))
        if cand == caption:
            continue
        claim = parse_caption(cand)
        if allowed_pairs is not None and any(
            (m.colour, m.shape) not in allowed_pairs for m in claim.mentions
        ):
            continue
        if not claim_holds(claim, objs):
            return cand
    return None


_ATTR_COLOUR_FORMS: tuple[str, ...] = ("a {} shape", "a {} object", "something {}", "there is a {} shape")
_ATTR_SHAPE_FORMS: tuple[str, ...] = ("a {}", "there is a {}", "a picture of a {}")


def attribute_caption(
    objects: Sequence[SceneObject | dict], rng: np.random.Generator, *, true: bool
) -> str | None:
    """A caption naming one attribute alone, a colour ("a red shape") or a shape ("a triangle"), that is
    ``true`` or false for the scene (a false one names a colour or shape absent from it).

    Training data for the matching head: it grounds colours and shapes separately, so a caption naming an
    unseen (colour, shape) pair is not just an unknown conjunction. ``None`` if no such caption exists."""
    objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in objects]
    colours = sorted({o.colour for o in objs})
    shapes = sorted({o.shape for o in objs})
    by_colour = bool(rng.random() < 0.5)
    for kind in (by_colour, not by_colour):
        if kind:
            pool = colours if true else [c for c in COLOURS if c not in colours]
            forms = _ATTR_COLOUR_FORMS
        else:
            pool = list(shapes) if true else [s for s in SHAPES if s not in shapes]
            forms = _ATTR_SHAPE_FORMS
        if pool:
            word = pool[int(rng.integers(0, len(pool)))]
            return fix_articles(forms[int(rng.integers(0, len(forms)))].format(word))
    return None


# ---------------------------------------------------------------------------------------------- on disk


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], GENERATOR_VERSION])


def sample_scenes(seed: int, count: int, split: str = "train") -> list[SceneSpec]:
    """``count`` scene specs for ``(seed, split)``, in groups (the last group may be cut short)."""
    if split not in _SPLIT_CODE:
        raise InvalidInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if count < 1:
        raise InvalidInputError(f"count must be >= 1, got {count}")
    rng = _rng(seed, split)
    specs: list[SceneSpec] = []
    group = 0
    while len(specs) < count:
        members = sample_group(rng, split, group)
        if not members:
            continue
        specs.extend(members[: count - len(specs)])
        group += 1
    return specs


def generate_scenes(
    out_dir: str | Path, seed: int = 0, count: int = 1000, split: str = "train", size: int = 96
) -> Path:
    """Write ``count`` scenes (PNGs + Karpathy-style ``scenes.json``) under ``out_dir``; return the JSON path."""
    out = Path(out_dir)
    specs = sample_scenes(seed, count, split)
    cap_rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], GENERATOR_VERSION, 1])
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, spec in enumerate(specs, start=1):
        rel = f"images/{i:06d}.png"
        render_scene(spec, size).save(out / rel, format="PNG", optimize=False)
        entries.append(
            {
                "image": rel,
                "caption": caption_scene(spec, cap_rng),
                "group": spec.group,
                "objects": [asdict(o) for o in spec.objects],
            }
        )
    path = out / "scenes.json"
    path.write_text(json.dumps(entries, indent=1) + "\n")
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "count": len(entries),
        "size": size,
        "groups": len({e["group"] for e in entries}),
        "held_out_pairs": sorted(list(p) for p in HELD_OUT_PAIRS),
    }
    (out / "scenes_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("wrote %d %s scenes (seed %d, %d px) to %s", len(entries), split, seed, size, out)
    return path


def load_objects(entry: dict) -> list[SceneObject]:
    return [SceneObject(**o) for o in entry.get("objects", [])]
