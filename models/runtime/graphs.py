"""The ONNX graph cache: where exported graphs live, when a cached one may be used, atomic export, int8
quantization and ONNX Runtime sessions.

A model's graphs are cached next to its weights file (``<weights dir>/onnx/<weights stem>/``), or, when that
folder cannot be written (an installed package, a read-only container) or the model has no weights file
(random init), in the per-user cache (``<cache_dir>/onnx/<weights sha256[:16]>/``, ``cache_dir`` defaulting
to :data:`alignfuse.models.hub.DEFAULT_CACHE_DIR`, the folder ALBEF checkpoints are downloaded to).

Each graph ``<name>.<precision>.onnx`` has a sidecar ``<name>.<precision>.json`` holding its *fingerprint*:
the weights' sha256, the model's architecture, the format version and the exporter/runtime versions. A
cached graph is used only when its sidecar's fingerprint equals the wanted one; otherwise it is stale
(weights changed) and rebuilt. Both files are written to temporary names in the same folder and renamed into
place, the graph first and its sidecar last, so a process killed mid-export leaves at most a temporary file
(never loaded) or a graph without a matching sidecar (rebuilt), never a corrupt graph that loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignfuse.errors import ModelUnavailableError

log = logging.getLogger(__name__)

#: bumped whenever the exported graphs' inputs, outputs or computation change
FORMAT_VERSION = 1
OPSET = 17


@dataclass(frozen=True)
class GraphKey:
    """What a cached graph was built from; a cached graph whose key differs is stale."""

    name: str  # e.g. "albef-text"
    precision: str  # fp32 | int8
    weights_sha256: str
    arch: str  # architecture / config fingerprint
    format_version: int = FORMAT_VERSION
    torch_version: str = torch.__version__
    onnxruntime_version: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.precision}"


def graph_key(name: str, precision: str, weights_sha256: str, arch: str) -> GraphKey:
    """A :class:`GraphKey` with the installed exporter and runtime versions filled in."""
    return GraphKey(name, precision, weights_sha256, arch, onnxruntime_version=ort_version())


def ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (created if missing); probes with a real file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True):
            pass
    except OSError:
        return False
    return True


def graph_dir(weights: str | None, weights_sha256: str, cache_dir: str | Path | None = None) -> Path:
    """The folder a model's graphs are cached in: beside ``weights`` (a file path) when writable, else the
    per-user cache keyed by the checksum (see the module docstring)."""
    if weights:
        path = Path(weights)
        if path.is_file():
            beside = path.parent / "onnx" / path.stem
            if _writable(beside):
                return beside
            log.info("%s is not writable: caching ONNX graphs in the user cache", beside)
    from alignfuse.models.hub import DEFAULT_CACHE_DIR

    root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    folder = root / "onnx" / weights_sha256[:16]
    if not _writable(folder):
        raise ModelUnavailableError(f"cannot write ONNX graphs to {folder} (nor beside the weights)")
    return folder


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread); 022 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``target``, fsync it, then rename it onto ``target``."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: let other users (a service uid) read it
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(target.parent)


def _read_key(meta: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def cached_graph(folder: Path, key: GraphKey, build: Callable[[Path], None]) -> Path:
    """The path of graph ``key`` in ``folder``: the cached file when its sidecar matches ``key``, else
    ``build(tmp_path)`` writes it (atomically, see the module docstring) and the sidecar is (re)written."""
    target = folder / f"{key.filename}.onnx"
    meta = folder / f"{key.filename}.json"
    want = asdict(key)
    if target.is_file() and _read_key(meta) == want:
        return target
    if target.exists():
        log.info("ONNX graph %s is stale (weights or versions changed): rebuilding", target)
    else:
        log.info("exporting ONNX graph %s", target)
    meta.unlink(missing_ok=True)  # from here on the old graph (if any) no longer counts as built
    _atomic_write(target, build)
    _atomic_write(meta, lambda tmp: _write_json(tmp, want))
    return target


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """TorchScript-based ONNX export of ``module(*args)`` (fp32, eval mode) to ``path``."""
    import warnings

    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path (open_clip's towers) is a fused op ONNX cannot express
    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic, deprecation notes
        try:
            _export(module, args, path, input_names, output_names, dynamic_axes)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset_version=OPSET,
        do_constant_folding=True,
    )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of ``src``'s MatMul/Gemm weights (per-channel, signed int8 weights, uint8
    activations quantized per batch at run time) into ``dst``. Convolutions (the patch embedding) and the
    attention products between activations stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
    )


def graph_for(folder: Path, key: GraphKey, export: Callable[[Path], None]) -> Path:
    """The fp32 graph, or the int8 graph quantized from it (both cached), for ``key.precision``."""
    fp32 = cached_graph(folder, GraphKey(**{**asdict(key), "precision": "fp32"}), export)
    if key.precision == "fp32":
        return fp32
    if key.precision != "int8":
        raise ValueError(f"ONNX graphs are fp32 or int8, not {key.precision}")
    return cached_graph(folder, key, lambda tmp: quantize_int8(fp32, tmp))


def make_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session over ``path`` with ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_session(
    folder: Path, key: GraphKey, export: Callable[[Path], None], threads: int | None = None
) -> Any:
    """Session over the cached graph for ``key`` (built when missing or stale). A cached graph that ONNX
    Runtime cannot load (damaged on disk) is rebuilt once."""
    path = graph_for(folder, key, export)
    try:
        return make_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own exception types
        log.warning("cached ONNX graph %s does not load (%s): rebuilding", path, exc)
        for p in folder.glob(f"{key.name}.*.json"):
            p.unlink(missing_ok=True)
        return make_session(graph_for(folder, key, export), threads)
