"""The caption grammar: true captions of a scene (:func:`caption_scene`) and their parse back into a
:class:`Claim` (:func:`parse_caption`), what a caption asserts."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .world import (
    _INVERSE,
    _NUMBER_WORDS,
    _PLURAL,
    _SINGULAR,
    _WORD_NUMBERS,
    COLOURS,
    SHAPES,
    SceneObject,
    SceneSpec,
    relation_between,
)


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
    """``n`` true captions of ``spec`` from varied templates: distinct when the templates give ``n`` different
    ones, else some repeat (a single object, say, may have fewer)."""
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


@functools.lru_cache(maxsize=1 << 16)
def parse_caption(caption: str) -> Claim:
    """Parse a caption of the scenes grammar into a :class:`Claim` (mentions in order, first relation).

    Memoised (a :class:`Claim` is immutable): evaluations judge the same caption against many scenes."""
    text = " ".join(caption.lower().replace(",", " ").replace(":", " ").split())
    mentions = []
    spans = []
    for m in _MENTION_RE.finditer(text):
        num, size0, colour, size1, shape, colour2 = m.groups()
        # "shape(s)" is no alternative of _SHAPE_RE, so "a red shape" and "three shapes" never match here
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


# ------------------------------------------------------------------------------------------- probe queries

#: the kinds of :func:`probe_queries`, in order
PROBE_KINDS: tuple[str, ...] = ("colour_shape", "shape", "count", "relation")


def probe_queries(scenes: Iterable[Sequence[SceneObject | Mapping[str, object]]]) -> dict[str, list[str]]:
    """Queries a user might type, phrased in the caption grammar (each parses back with :func:`parse_caption`),
    built from what the given scenes draw; per kind of :data:`PROBE_KINDS`, sorted and distinct:

    ``colour_shape`` "a red circle" for every (colour, shape) drawn; ``shape`` "a circle" for every shape drawn;
    ``count`` "two red circles" for every kind drawn two or three times in one scene; ``relation``
    "a red circle left of a blue square" for every pair of objects in a clear relation, each drawn once in its
    scene. Which scenes make a query *true* is :func:`~alignfuse.data.scenes.caption_matches`' to judge."""
    out: dict[str, set[str]] = {k: set() for k in PROBE_KINDS}
    for scene in scenes:
        objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in scene]  # type: ignore[arg-type]
        kinds: dict[tuple[str, str], list[SceneObject]] = {}
        for o in objs:
            kinds.setdefault((o.colour, o.shape), []).append(o)
            out["colour_shape"].add(_phrase(o, with_size=False))
            out["shape"].add(f"{_article(o.shape)} {o.shape}")
        for same in kinds.values():
            if len(same) > 1:
                out["count"].add(_count_phrase(len(same), same[0], with_size=False))
        for a in objs:
            for b in objs:
                if a is b or len(kinds[(a.colour, a.shape)]) > 1 or len(kinds[(b.colour, b.shape)]) > 1:
                    continue
                if (a.colour, a.shape) == (b.colour, b.shape):
                    continue
                rel = relation_between(a, b)
                if rel is not None:
                    out["relation"].add(f"{_phrase(a, with_size=False)} {rel} {_phrase(b, with_size=False)}")
    return {k: sorted(v) for k, v in out.items()}
