"""Hard negatives: minimally edited captions that are false of a scene, and single-attribute captions."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from .captions import _REL_RE, fix_articles, parse_caption
from .truth import claim_holds
from .world import _INVERSE, _PLURAL, _SINGULAR, COLOURS, SHAPES, SceneObject


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


_OBJECT_FORMS: tuple[str, ...] = ("a {} {}", "there is a {} {}", "a picture of a {} {}")


def object_caption(
    objects: Sequence[SceneObject | dict], rng: np.random.Generator, *, pair_share: float = 0.7
) -> tuple[str, str | None, str | None]:
    """A short caption naming one drawn object, as people type queries: its colour and shape ("a red
    circle", with probability ``pair_share``), else its shape alone ("a circle") or its colour alone ("a red
    shape"), half each. Returns (caption, colour or None, shape or None): the caption is true of every scene
    holding an object with the named colour and shape (any count)."""
    objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in objects]
    if not objs:
        raise ValueError("a scene without objects has no object caption")
    o = objs[int(rng.integers(0, len(objs)))]
    r = float(rng.random())
    if r < pair_share:
        form = _OBJECT_FORMS[int(rng.integers(0, len(_OBJECT_FORMS)))]
        return fix_articles(form.format(o.colour, o.shape)), o.colour, o.shape
    if r < pair_share + (1.0 - pair_share) / 2:
        form = _ATTR_SHAPE_FORMS[int(rng.integers(0, len(_ATTR_SHAPE_FORMS)))]
        return fix_articles(form.format(o.shape)), None, o.shape
    form = _ATTR_COLOUR_FORMS[int(rng.integers(0, len(_ATTR_COLOUR_FORMS)))]
    return fix_articles(form.format(o.colour)), o.colour, None
