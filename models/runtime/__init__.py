"""Runtimes and int8: the same models executed by ONNX Runtime (``runtime="onnx"``) or by PyTorch with
dynamically quantized Linear layers (``runtime="torch"``, ``precision="int8"``), behind the same protocols.

:func:`wrap_dual` / :func:`wrap_cross` take a model a family factory built (fp32, torch) and return the model
to serve for the asked runtime and precision; :func:`resolve_runtime` turns ``auto`` into ``torch`` or
``onnx``. Supported on ONNX Runtime: ALBEF (dual and cross) and open_clip (dual); other families and other
devices run on torch.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from alignfuse.errors import InvalidInputError
from alignfuse.models.base import CrossEncoder, DualEncoder
from alignfuse.models.runtime.graphs import onnxruntime_available

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)

#: ``auto`` picks ONNX Runtime on a CPU for models with at least this many parameters. Measured here
#: (bench/cpu.py, docs/benchmarks.md): ONNX Runtime fp32 beats eager torch on base-size ALBEF and ViT-B-32;
#: for the tiny test/demo models the export (seconds) buys nothing, so they stay on torch.
AUTO_MIN_PARAMS = 20_000_000


def _torch_module(model: Any) -> nn.Module | None:
    inner = getattr(model, "bundle", None)
    if inner is not None:
        return inner.model  # type: ignore[no-any-return]
    m = getattr(model, "model", None)
    return m if isinstance(m, nn.Module) else None


def onnx_supported(model: Any) -> bool:
    from alignfuse.models.albef.adapters import AlbefCrossEncoder, AlbefDualEncoder
    from alignfuse.models.openclip import OpenClipDualEncoder

    return isinstance(model, AlbefDualEncoder | AlbefCrossEncoder | OpenClipDualEncoder)


def parameter_count(model: Any) -> int:
    """Parameters of the torch module behind an adapter (0 when there is none)."""
    module = _torch_module(model)
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def resolve_runtime(runtime: str, model: Any, device: torch.device, precision: str = "fp32") -> str:
    """``torch`` or ``onnx`` for ``model`` on ``device``. ``onnx`` asked for where it cannot run (a GPU, a
    family without graphs, onnxruntime not installed) is an InvalidInputError; ``auto`` picks ``onnx`` on a
    CPU for supported models of at least :data:`AUTO_MIN_PARAMS` parameters when onnxruntime is installed."""
    if runtime == "torch":
        return "torch"
    if runtime not in ("onnx", "auto"):
        raise InvalidInputError(f"runtime must be torch, onnx or auto, got {runtime!r}")
    reason = None
    if precision not in ("fp32", "int8"):
        reason = f"it runs fp32 or int8, not {precision}"
    elif device.type != "cpu":
        reason = f"the onnx runtime runs on the CPU only (device {device})"
    elif not onnx_supported(model):
        reason = f"{model.info.family} models have no ONNX graphs (supported: albef, open_clip)"
    elif not onnxruntime_available():
        reason = "onnxruntime is not installed (pip install 'alignfuse[cpu]')"
    if reason is not None:
        if runtime == "onnx":
            raise InvalidInputError(f"--runtime onnx: {reason}")
        return "torch"
    if runtime == "auto":
        return "onnx" if parameter_count(model) >= AUTO_MIN_PARAMS else "torch"
    return "onnx"


def quantize_torch(module: M) -> M:
    """A copy of ``module`` with every ``nn.Linear`` dynamically quantized to int8 (torch.ao)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(module).eval(), {nn.Linear}, dtype=torch.qint8)  # type: ignore[no-any-return]


def _float32() -> torch.dtype:
    return torch.float32


def _torch_int8_dual(model: Any) -> Any:
    from alignfuse.models.albef.adapters import AlbefDualEncoder
    from alignfuse.models.openclip import OpenClipDualEncoder

    if isinstance(model, AlbefDualEncoder):
        bundle = replace(model.bundle, model=quantize_torch(model.bundle.model), precision="int8")
        out: Any = AlbefDualEncoder(bundle, model.info)
    elif isinstance(model, OpenClipDualEncoder):
        qmodel = quantize_torch(model.model)
        for m in qmodel.modules():  # open_clip reads its dtype from a Linear weight, a method once quantized
            if hasattr(m, "get_cast_dtype"):
                setattr(m, "get_cast_dtype", _float32)  # noqa: B010
        out = OpenClipDualEncoder(
            qmodel,
            model.image_transform,
            model.tokenizer,
            model.info,
            model.device,
            "fp32",
        )
    else:
        raise InvalidInputError(f"int8 is not supported for {model.info.family} models (albef, open_clip)")
    _set_active(out, "torch", "int8")
    return out


def _check_int8(device: torch.device) -> None:
    if device.type != "cpu":
        raise InvalidInputError(f"precision int8 runs on the CPU only (device {device}); use fp16 or bf16")


def wrap_dual(
    model: DualEncoder, runtime: str, precision: str, cache_dir: str | Path | None = None
) -> DualEncoder:
    """``model`` (built fp32 by its family when ``precision`` is int8) on the runtime/precision asked for.
    The result has ``runtime`` and ``precision`` attributes naming what is active."""
    chosen = resolve_runtime(runtime, model, model.device, precision)
    if precision == "int8":
        _check_int8(model.device)
    out: Any = None
    if chosen == "onnx":
        out = _onnx_or_none(runtime, model, lambda: _onnx_dual(model, precision, cache_dir))
    if out is not None:
        pass
    elif precision == "int8":
        out = _torch_int8_dual(model)
    else:
        out = model
        _set_active(out, "torch", precision)
    log.info("%s: runtime %s, precision %s", model.info.spec, out.runtime, out.precision)
    return out  # type: ignore[no-any-return]


def wrap_cross(
    model: CrossEncoder, runtime: str, precision: str, cache_dir: str | Path | None = None
) -> CrossEncoder:
    """Like :func:`wrap_dual` for a cross-encoder (ALBEF on ONNX Runtime / torch int8)."""
    from alignfuse.models.albef.adapters import AlbefCrossEncoder

    chosen = resolve_runtime(runtime, model, model.device, precision)
    if precision == "int8":
        _check_int8(model.device)
    out: Any = None
    if chosen == "onnx":
        from alignfuse.models.runtime.albef import OnnxAlbefCrossEncoder, albef_graphs

        assert isinstance(model, AlbefCrossEncoder)
        out = _onnx_or_none(
            runtime,
            model,
            lambda: OnnxAlbefCrossEncoder(
                model, albef_graphs(model.bundle, _onnx_precision(precision), cache_dir)
            ),
        )
    if out is not None:
        pass
    elif precision == "int8":
        if not isinstance(model, AlbefCrossEncoder):
            raise InvalidInputError(f"int8 is not supported for {model.info.family} rerankers (albef)")
        bundle = replace(model.bundle, model=quantize_torch(model.bundle.model), precision="int8")
        out = AlbefCrossEncoder(bundle, model.info, kv_cache=model.kv_cache, max_pairs=model.max_pairs)
        _set_active(out, "torch", "int8")
    else:
        out = model
        _set_active(out, "torch", precision)
    log.info("%s: runtime %s, precision %s", model.info.spec, out.runtime, out.precision)
    return out  # type: ignore[no-any-return]


def _onnx_dual(model: Any, precision: str, cache_dir: str | Path | None) -> Any:
    from alignfuse.models.albef.adapters import AlbefDualEncoder

    if isinstance(model, AlbefDualEncoder):
        from alignfuse.models.runtime.albef import OnnxAlbefDualEncoder, albef_graphs

        return OnnxAlbefDualEncoder(model, albef_graphs(model.bundle, _onnx_precision(precision), cache_dir))
    from alignfuse.models.openclip import OpenClipDualEncoder
    from alignfuse.models.runtime.openclip import OnnxOpenClipDualEncoder

    assert isinstance(model, OpenClipDualEncoder)
    return OnnxOpenClipDualEncoder(model, _onnx_precision(precision), cache_dir)


def _onnx_or_none(runtime: str, model: Any, build: Callable[[], Any]) -> Any:
    """``build()``; under ``auto`` a failure (no writable cache folder, an export error) logs a warning and
    gives None (the caller serves the torch model) instead of failing the start."""
    if runtime != "auto":
        return build()
    try:
        return build()
    except Exception as exc:
        log.warning("%s: ONNX Runtime unavailable (%s): serving with torch", model.info.spec, exc)
        return None


def _onnx_precision(precision: str) -> str:
    if precision not in ("fp32", "int8"):
        raise InvalidInputError(f"the onnx runtime runs fp32 or int8, not {precision}")
    return precision


def _set_active(model: Any, runtime: str, precision: str) -> None:
    """Record the active runtime/precision on a torch adapter (read by the service's models info)."""
    model.runtime = runtime
    model.precision = precision


def active_runtime(model: Any) -> str:
    """The runtime a model built by the registry runs on (``torch`` for models built another way)."""
    return str(getattr(model, "runtime", "torch"))


def active_precision(model: Any, default: str = "fp32") -> str:
    """The precision a model built by the registry runs at (``default`` for models built another way)."""
    return str(getattr(model, "precision", default))


def precision_label(dual: Any, cross: Any | None, default: str = "fp32") -> str:
    """What the service reports as its precision: one value when the dual encoder and the reranker (if any)
    agree, else ``dual:<precision>, reranker:<precision>`` (as :func:`runtime_label`)."""
    d = active_precision(dual, default)
    if cross is None or active_precision(cross, default) == d:
        return d
    return f"dual:{d}, reranker:{active_precision(cross, default)}"


def runtime_label(dual: Any, cross: Any | None) -> str:
    """What the service reports as its runtime: ``torch`` / ``onnx`` when the dual encoder and the reranker
    (if any) agree, else ``dual:<runtime>, reranker:<runtime>``."""
    d = active_runtime(dual)
    if cross is None or active_runtime(cross) == d:
        return d
    return f"dual:{d}, reranker:{active_runtime(cross)}"


__all__ = [
    "AUTO_MIN_PARAMS",
    "active_precision",
    "active_runtime",
    "parameter_count",
    "precision_label",
    "quantize_torch",
    "resolve_runtime",
    "runtime_label",
    "wrap_cross",
    "wrap_dual",
]
