"""Model specs, the family registry and the ``create_*`` factories (open_clip/timm style).

A spec is one string: ``family:name[@tag]``.

===========================================  ==========================================================
``open_clip:ViT-B-32@laion2b_s34b_b79k``     open_clip architecture + pretrained tag
``open_clip:ViT-B-32@/path/weights.bin``     open_clip architecture + local weights file
``open_clip:ViT-B-32``                       open_clip architecture, random init (logged as such)
``open_clip:hf-hub:org/repo``                open_clip model from the Hugging Face hub
``albef:base@coco`` / ``@flickr30k`` /       official ALBEF checkpoints (mscoco.pth, flickr30k.pth,
``@4m`` / ``@14m``                           ALBEF_4M.pth, ALBEF.pth)
``albef:base@/path/file.pth``                local ALBEF checkpoint
``albef:/path/config.json@/path/file.pth``   custom ALBEF size + weights
``blip:Salesforce/blip-itm-base-coco``       BLIP ITM through transformers (hub id or local directory)
``vilt:dandelin/vilt-b32-finetuned-coco``    ViLT single-stream ITM through transformers (hub id or dir)
``alignfuse:<name>``                         the project's own models shipped in the package
===========================================  ==========================================================
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.base import (
    PRECISION_CHOICES,
    RUNTIMES,
    CrossEncoder,
    DualEncoder,
    Precision,
    cpu_has_native_bf16,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec string. ``tag`` is a pretrained tag, a path, or None (random init / family default)."""

    family: str
    name: str
    tag: str | None
    raw: str

    def __str__(self) -> str:
        return self.raw


DualFactory = Callable[[ModelSpec, torch.device, Precision], DualEncoder]
CrossFactory = Callable[[ModelSpec, torch.device, Precision], CrossEncoder]


@dataclass(frozen=True)
class ModelEntry:
    """One line of ``list_models()``."""

    spec: str
    kind: Literal["dual", "cross", "dual+cross"]
    description: str
    cached: bool | None = None  # None: not applicable (random init / shipped in the package)


@dataclass(frozen=True)
class _Family:
    name: str
    dual: DualFactory | None
    cross: CrossFactory | None
    known: Callable[[], list[ModelEntry]] | None


_FAMILIES: dict[str, _Family] = {}
# Modules that register a family when imported. A module that does not exist (yet) is skipped.
_FAMILY_MODULES = (
    "alignfuse.models.openclip",
    "alignfuse.models.albef",
    "alignfuse.models.blip",
    "alignfuse.models.vilt",
    "alignfuse.models.builtin",
)
_loaded = False


def register_family(
    name: str,
    *,
    dual: DualFactory | None = None,
    cross: CrossFactory | None = None,
    known: Callable[[], list[ModelEntry]] | None = None,
) -> None:
    """Register the factories of a model family (``open_clip``, ``albef``, ...)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"bad family name {name!r}")
    _FAMILIES[name] = _Family(name, dual, cross, known)


def _ensure_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _FAMILY_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            log.debug("model family module %s not present", mod)


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``family:name[@tag]``. Raises InvalidInputError naming the spec when malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError("model spec is empty; expected 'family:name[@tag]', e.g. open_clip:ViT-B-32")
    raw = spec.strip()
    family, sep, rest = raw.partition(":")
    if not sep or not family or not rest:
        raise InvalidInputError(
            f"model spec {raw!r} has no family; expected 'family:name[@tag]' "
            f"(families: {', '.join(sorted(known_families()))})"
        )
    name, at, tag = rest.partition("@")
    if not name:
        raise InvalidInputError(f"model spec {raw!r} has an empty name")
    if at and not tag:
        raise InvalidInputError(f"model spec {raw!r} has an empty tag after '@'")
    return ModelSpec(family=family, name=name, tag=tag if at else None, raw=raw)


def known_families() -> list[str]:
    _ensure_families()
    return sorted(_FAMILIES)


def resolve_device(device: str | torch.device) -> torch.device:
    """The one device parser: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when available, else
    CPU). InvalidInputError for anything else, or for CUDA on a machine without it."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch rejects the string itself
        raise InvalidInputError(f"{str(device)!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"unsupported device {str(device)!r}; use cpu or cuda")
    return dev


def _check_precision(precision: str, device: torch.device) -> Precision:
    """The precision a family builds with: ``auto`` and int8 build fp32 (int8 is quantized afterwards); on a CPU
    every model is built fp32 (bf16 there is autocast over fp32 weights, decided by :func:`_cpu_precision`)."""
    if precision not in PRECISION_CHOICES:
        raise InvalidInputError(f"precision {precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
    if precision == "auto":
        return "fp32"
    if precision == "int8":
        if device.type != "cpu":
            raise InvalidInputError(
                f"precision int8 runs on the CPU only (device {device}); use fp16 or bf16"
            )
        return "fp32"  # the family builds fp32; the runtime layer quantizes (models/runtime)
    if precision == "fp16" and device.type == "cpu":
        log.warning("precision fp16 runs on GPUs only; running fp32 on the CPU")
    return "fp32" if device.type == "cpu" else precision  # type: ignore[return-value]


def _cpu_precision(model: object, requested: str, built: Precision, device: torch.device) -> Precision:
    """What a model built on ``device`` runs: on a CPU, ``bf16`` (autocast) where the CPU has native bf16
    (AMX / AVX512-BF16) and the adapter says bf16 autocast is fast for it (``cpu_bf16 = True``: ALBEF;
    measured slower for open_clip); ``auto`` picks bf16 there for models of at least ``AUTO_MIN_PARAMS``
    parameters (the fastest CPU path, 2.2x fp32 for a base ALBEF rerank; it misses the strict parity bounds
    narrowly, so it is opt-in: docs/benchmarks.md) and fp32 otherwise."""
    if device.type != "cpu" or requested not in ("bf16", "auto"):
        return built
    capable = bool(getattr(model, "cpu_bf16", False))
    native = cpu_has_native_bf16()
    if requested == "bf16":
        if capable and native:
            return "bf16"
        why = (
            "no native bf16: AMX or AVX512-BF16"
            if capable
            else "bf16 autocast is slower than fp32 for it there"
        )
        log.warning("precision bf16 on this CPU runs fp32 (%s)", why)
        return "fp32"
    from alignfuse.models.runtime import AUTO_MIN_PARAMS, parameter_count

    return "bf16" if capable and native and parameter_count(model) >= AUTO_MIN_PARAMS else "fp32"


def _record_active(model: object, precision: str) -> None:
    """Name what a torch-runtime model runs (read by ``models.runtime.active_precision``)."""
    try:
        model.runtime = "torch"  # type: ignore[attr-defined]
        model.precision = precision  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - an adapter with slots
        pass


def _family_for(spec: ModelSpec) -> _Family:
    _ensure_families()
    fam = _FAMILIES.get(spec.family)
    if fam is None:
        raise InvalidInputError(
            f"unknown model family {spec.family!r} in spec {spec.raw!r}; known: {', '.join(sorted(_FAMILIES))}"
        )
    return fam


def _check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise InvalidInputError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


def create_dual_encoder(
    spec: str | ModelSpec,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    runtime: str = "torch",
    graph_cache_dir: str | Path | None = None,
) -> DualEncoder:
    """Build the stage-1 model named by ``spec`` (see the module docstring for spec forms).

    ``runtime``: ``torch``, ``onnx`` (ONNX Runtime, CPU) or ``auto``; ``precision`` ``int8`` quantizes the
    weights (CPU). See :mod:`alignfuse.models.runtime`; ``graph_cache_dir`` is where exported graphs go when
    the weights' folder is not writable (default: the per-user cache). The model's ``runtime`` and
    ``precision`` attributes say what is active."""
    ms = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    fam = _family_for(ms)
    if fam.dual is None:
        raise InvalidInputError(f"{ms.raw}: family {fam.name!r} has no dual encoder")
    dev = resolve_device(device)
    rt = _check_runtime(runtime)
    built = _check_precision(precision, dev)
    model = fam.dual(ms, dev, built)
    if precision != "int8":
        precision = _cpu_precision(model, precision, built, dev)
    if rt == "torch" and precision != "int8":
        _record_active(model, precision)
        return model
    from alignfuse.models.runtime import wrap_dual

    return wrap_dual(model, rt, precision, graph_cache_dir)


def create_cross_encoder(
    spec: str | ModelSpec,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    runtime: str = "torch",
    graph_cache_dir: str | Path | None = None,
) -> CrossEncoder:
    """Build the stage-2 (ITM) model named by ``spec`` (``runtime``/``precision``: as
    :func:`create_dual_encoder`)."""
    ms = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    fam = _family_for(ms)
    if fam.cross is None:
        raise InvalidInputError(
            f"{ms.raw}: family {fam.name!r} has no cross-encoder (rerankers: albef, blip, vilt, alignfuse:scenes-albef)"
        )
    dev = resolve_device(device)
    rt = _check_runtime(runtime)
    built = _check_precision(precision, dev)
    model = fam.cross(ms, dev, built)
    if precision != "int8":
        precision = _cpu_precision(model, precision, built, dev)
    if rt == "torch" and precision != "int8":
        _record_active(model, precision)
        return model
    from alignfuse.models.runtime import wrap_cross

    return wrap_cross(model, rt, precision, graph_cache_dir)


def list_models() -> list[ModelEntry]:
    """Known specs of every registered family, with whether their weights are cached locally."""
    _ensure_families()
    out: list[ModelEntry] = []
    for fam in sorted(_FAMILIES.values(), key=lambda f: f.name):
        if fam.known is not None:
            try:
                out.extend(fam.known())
            except ModelUnavailableError as exc:  # pragma: no cover - listing must not fail
                log.warning("cannot list %s models: %s", fam.name, exc)
    return out
