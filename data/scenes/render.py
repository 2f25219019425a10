"""Rendering: a scene spec → pixels (a pure function: same spec, same bytes)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from alignfuse.errors import InvalidInputError

from .world import COLOURS, SceneSpec


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
