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

Modules: :mod:`.world` (objects, specs, relations, sampling, splits, held-out pairs), :mod:`.render` (pixels),
:mod:`.captions` (the caption grammar and its parser), :mod:`.truth` (does a caption hold of a scene),
:mod:`.negatives` (false captions for training), :mod:`.generate` (the files on disk). Every public name is
importable from this package.
"""

from .captions import PROBE_KINDS, Claim, Mention, caption_scene, fix_articles, parse_caption, probe_queries
from .generate import GENERATOR_VERSION, generate_scenes, sample_scenes
from .negatives import attribute_caption, object_caption, perturb_caption
from .render import render_scene
from .truth import caption_matches, claim_holds, shows
from .world import (
    COLOURS,
    HELD_OUT_PAIRS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    SceneObject,
    SceneSpec,
    Split,
    relation_between,
    relation_holds,
    sample_group,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "HELD_OUT_PAIRS",
    "PROBE_KINDS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Claim",
    "Mention",
    "SceneObject",
    "SceneSpec",
    "Split",
    "attribute_caption",
    "caption_matches",
    "caption_scene",
    "claim_holds",
    "fix_articles",
    "generate_scenes",
    "object_caption",
    "parse_caption",
    "perturb_caption",
    "probe_queries",
    "relation_between",
    "relation_holds",
    "render_scene",
    "sample_group",
    "sample_scene",
    "sample_scenes",
    "shows",
]
