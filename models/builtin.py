"""The project's own models, shipped inside the package: ``alignfuse:<name>``.

``random-tiny``     a tiny deterministic random-init CLIP (fixed seed) for tests and benchmarks
``scenes-clip``     an open_clip CLIP trained by ``alignfuse train`` on the synthetic scenes
``scenes-albef``    an ALBEF (ITC + ITM) trained by ``alignfuse train`` on the synthetic scenes
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import torch

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import FUSIONS, CrossEncoder, DualEncoder, Precision
from alignfuse.models.registry import ModelEntry, ModelSpec, parse_spec, register_family

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

RANDOM_TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_DESCRIPTIONS = {
    "random-tiny": "tiny random-init CLIP (seed 0, embed 64, 64 px) for tests and benchmarks",
    "scenes-clip": "CLIP trained on the built-in synthetic scenes (offline default dual encoder)",
    "scenes-albef": "ALBEF (ITC + ITM) trained on the built-in synthetic scenes (offline default reranker)",
}


def _register_open_clip_config(name: str, cfg: dict[str, object]) -> None:
    """Make a custom architecture known to open_clip (it needs embed_dim, vision_cfg and text_cfg)."""
    from open_clip import factory

    if name not in factory._MODEL_CONFIGS:
        factory._MODEL_CONFIGS[name] = cfg


def _builtin_name(spec: ModelSpec) -> str:
    if spec.tag is not None:
        raise InvalidInputError(f"{spec.raw}: built-in models take no '@tag'")
    if spec.name not in _DESCRIPTIONS:
        raise InvalidInputError(
            f"unknown built-in model {spec.raw!r}; known: {', '.join('alignfuse:' + n for n in _DESCRIPTIONS)}"
        )
    return spec.name


def _weights_file(stem: str, spec: ModelSpec) -> Path:
    path = WEIGHTS_DIR / f"{stem}.safetensors"
    if not path.is_file():
        raise ModelUnavailableError(
            f"{spec.raw}: shipped weights {path} are missing from this installation (train them with "
            f"`alignfuse train`, see docs/models.md)"
        )
    return path


def scenes_albef_default_fusion() -> str:
    """The score fusion the shipped ALBEF reranks with by default: whichever of :data:`~alignfuse.models.base.FUSIONS` scored
    better on the validation splits when the weights were exported (``scenes-albef.fusion.json``, written by
    ``docs/training/choose_fusion.py``; the test splits are never used for the choice)."""
    path = WEIGHTS_DIR / "scenes-albef.fusion.json"
    if not path.is_file():
        return "itm"
    choice = json.loads(path.read_text(encoding="utf-8")).get("default_fusion", "itm")
    if choice not in FUSIONS:
        raise ModelUnavailableError(
            f"{path}: default_fusion must be one of {', '.join(FUSIONS)}, got {choice!r}"
        )
    return str(choice)


def _scenes_albef_spec(spec: ModelSpec) -> ModelSpec:
    cfg = WEIGHTS_DIR / "scenes-albef.json"
    weights = _weights_file("scenes-albef", spec)
    return parse_spec(f"albef:{cfg}@{weights}")


def _dual(spec: ModelSpec, device: torch.device, precision: Precision) -> DualEncoder:
    from dataclasses import replace

    from alignfuse.models.openclip import build_open_clip

    name = _builtin_name(spec)
    if name == "random-tiny":
        _register_open_clip_config("alignfuse-random-tiny", RANDOM_TINY_CONFIG)
        enc = build_open_clip(
            spec, device, precision, arch="alignfuse-random-tiny", seed=0, description=_DESCRIPTIONS[name]
        )
        return enc
    if name == "scenes-clip":
        cfg = json.loads((WEIGHTS_DIR / "scenes-clip.json").read_text())
        _register_open_clip_config("alignfuse-scenes-clip", cfg)
        enc = build_open_clip(
            spec,
            device,
            precision,
            arch="alignfuse-scenes-clip",
            weights=str(_weights_file("scenes-clip", spec)),
            description=_DESCRIPTIONS[name],
        )
        return enc
    from alignfuse.models.registry import create_dual_encoder

    inner = create_dual_encoder(_scenes_albef_spec(spec), device, precision)
    inner.info = replace(inner.info, spec=spec.raw, description=_DESCRIPTIONS[name])
    return inner


def _cross(spec: ModelSpec, device: torch.device, precision: Precision) -> CrossEncoder:
    from dataclasses import replace

    from alignfuse.models.registry import create_cross_encoder

    name = _builtin_name(spec)
    if name != "scenes-albef":
        raise InvalidInputError(
            f"{spec.raw} is a dual encoder only; the built-in reranker is alignfuse:scenes-albef"
        )
    inner = create_cross_encoder(_scenes_albef_spec(spec), device, precision)
    inner.info = replace(
        inner.info,
        spec=spec.raw,
        description=_DESCRIPTIONS[name],
        default_fusion=scenes_albef_default_fusion(),
    )
    return inner


def _known() -> list[ModelEntry]:
    return [
        ModelEntry("alignfuse:random-tiny", "dual", _DESCRIPTIONS["random-tiny"], None),
        ModelEntry(
            "alignfuse:scenes-clip",
            "dual",
            _DESCRIPTIONS["scenes-clip"],
            (WEIGHTS_DIR / "scenes-clip.safetensors").is_file(),
        ),
        ModelEntry(
            "alignfuse:scenes-albef",
            "dual+cross",
            _DESCRIPTIONS["scenes-albef"],
            (WEIGHTS_DIR / "scenes-albef.safetensors").is_file(),
        ),
    ]


_ = open_clip  # imported for its side effect of being importable before configs are registered
register_family("alignfuse", dual=_dual, cross=_cross, known=_known)
