"""Truth: whether a caption's claim holds of a scene's drawn objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .captions import Claim, Mention, parse_caption
from .world import SceneObject, relation_holds


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


def caption_matches(caption: str, objects: Sequence[SceneObject | Mapping[str, Any]]) -> bool:
    """Whether ``caption`` is true of a scene given as objects (or their JSON dicts)."""
    objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in objects]
    return claim_holds(parse_caption(caption), objs)


def shows(
    objects: Sequence[SceneObject | Mapping[str, Any]], colour: str | None = None, shape: str | None = None
) -> bool:
    """Whether some drawn object has ``colour`` (if given) and ``shape`` (if given): presence, whatever the
    count (``caption_matches("a red circle", ...)`` is false of a scene with two red circles; this is true)."""
    if colour is None and shape is None:
        return False
    objs = [o if isinstance(o, SceneObject) else SceneObject(**o) for o in objects]
    return claim_holds(Claim((), attributes=((colour, shape),)), objs)
