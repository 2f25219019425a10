"""Generation on disk: ``(seed, split)`` → scene specs → PNGs + the Karpathy-style ``scenes.json``."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from alignfuse.errors import InvalidInputError

from .captions import caption_scene
from .render import render_scene
from .world import _SPLIT_CODE, HELD_OUT_PAIRS, SPLITS, SceneSpec, sample_group

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1


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
