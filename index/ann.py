"""FAISS plumbing: build an index for one segment's vectors, save/load it (optionally memory-mapped), and a
search executor that runs searches on a GPU from one owning thread when faiss sees a GPU, else on the CPU.

Indexes use positional ids 0..n-1; each segment keeps a row-aligned int64 array of item ids beside its index
(works for every index type, including HNSW, where ``remove_ids`` does not exist: deletes are tombstones).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np

from alignfuse.errors import CorruptDataError, InvalidInputError

from .options import IndexOptions, resolve_search

log = logging.getLogger(__name__)

METRIC = faiss.METRIC_INNER_PRODUCT
GPU_MAX_K = 2048  # faiss GPU k limit: larger over-fetches fall back to the CPU copy
_T = TypeVar("_T")


def _needs_ivf(key: str) -> int:
    m = re.search(r"IVF(\d+)", key)
    return int(m.group(1)) if m else 0


def _pq_ksub(key: str) -> int:
    m = re.search(r"PQ(\d+)(?:x(\d+))?", key)
    if not m:
        return 0
    return 1 << int(m.group(2) or 8)


def validate_index_key(key: str, dim: int = 64) -> str:
    """Check that ``key`` is a FAISS factory string usable with the inner-product metric at ``dim``
    (InvalidInputError naming it otherwise); returns it stripped."""
    key = key.strip()
    if not key:
        raise InvalidInputError("--index-key: empty FAISS factory string")
    if "IDMap" in key:
        raise InvalidInputError(
            f"--index-key: {key!r}: do not wrap in IDMap (segments keep their own id arrays)"
        )
    try:
        faiss.index_factory(dim, key, METRIC)
    except RuntimeError as exc:
        text = str(exc).strip()
        m = re.search(r"at \S+:\d+: (.*)", text)
        msg = m.group(1) if m else (text.splitlines()[-1] if text else "invalid")
        raise InvalidInputError(
            f"--index-key: {key!r} is not a valid FAISS factory string for dim {dim}: {msg}"
        ) from None
    return key


def min_train_count(key: str) -> int:
    """How many vectors ``key`` needs to train well (0 when it needs no training)."""
    nlist = _needs_ivf(key)
    ksub = _pq_ksub(key)
    need = max(nlist, ksub)
    return 39 * need if need else 0


def effective_index_key(key: str, count: int, dim: int) -> str:
    """``key``, or ``"Flat"`` when ``key`` needs training and ``count`` vectors are too few for it."""
    need = min_train_count(key)
    if need and count < need:
        return "Flat"
    if not need:
        probe = faiss.index_factory(dim, key, METRIC)
        if not probe.is_trained and count < 1000:
            return "Flat"
    return key


def build_index(vectors: np.ndarray, key: str, options: IndexOptions, block: int = 65536) -> Any:
    """A trained, filled CPU FAISS index (inner product) over ``vectors`` [n, d] (positional ids), adding in
    blocks so a memory-mapped input is never loaded whole. Trainable keys train on a seeded random sample."""
    n, d = int(vectors.shape[0]), int(vectors.shape[1])
    index = faiss.index_factory(d, key, METRIC)
    if "HNSW" in key:
        hnsw = _find_hnsw(index)
        if hnsw is not None:
            hnsw.efConstruction = options.hnsw_ef_construction
    _no_polysemous(index)
    if not index.is_trained:
        need = max(min_train_count(key), 1)
        size = min(n, max(options.train_sample, 50 * max(_needs_ivf(key), _pq_ksub(key), 1) if need else 0))
        size = min(n, max(size, min(n, need)))
        rng = np.random.default_rng(options.seed)
        rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        log.debug("training %s on %d of %d vectors", key, size, n)
        index.train(sample)
    for start in range(0, n, block):
        index.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return index


def _no_polysemous(index: Any) -> None:
    """The factory turns on polysemous training for 8-bit PQ: slow, and unused by our searches."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        _no_polysemous(idx.base_index)
    elif hasattr(idx, "do_polysemous_training"):
        idx.do_polysemous_training = False


def _find_hnsw(index: Any) -> Any:
    idx: Any = faiss.downcast_index(index)
    try:
        return idx.hnsw
    except AttributeError:
        return None


def save_index(index: Any, path: Path) -> None:
    """Write ``index`` to ``path`` (the caller fsyncs)."""
    faiss.write_index(index, str(path))


def load_index(path: Path, key: str, options: IndexOptions) -> Any:
    """Read a CPU index; memory-mapped when ``options.mmap`` (IVF lists with ``IO_FLAG_MMAP``, Flat/HNSW
    storage with ``IO_FLAG_MMAP_IFC``)."""
    flags = 0
    if options.mmap:
        flags = (
            faiss.IO_FLAG_MMAP if _needs_ivf(key) else getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
        )
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise CorruptDataError(f"cannot read FAISS index {path}: {exc}") from exc


def search_params(index: Any, k: int, options: IndexOptions) -> Any:
    """Per-call search parameters (thread-safe: the index is not mutated) for HNSW / IVF / refine indexes:
    ``options``' explicit values, else the index's recipe (:func:`~.options.search_recipe` of its size)."""
    fx: Any = faiss  # the SWIG classes take keyword arguments that the stubs do not declare
    idx: Any = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        base = search_params(idx.base_index, k, options)
        kf = resolve_search(options, int(idx.ntotal)).refine_k_factor
        return fx.IndexRefineSearchParameters(k_factor=kf, base_index_params=base)
    if isinstance(idx, faiss.IndexHNSW):
        ef = resolve_search(options, int(idx.ntotal)).hnsw_ef_search
        return fx.SearchParametersHNSW(efSearch=max(ef, k))
    if isinstance(idx, faiss.IndexIVF):
        nprobe = resolve_search(options, int(idx.ntotal), int(idx.nlist)).ivf_nprobe
        return fx.SearchParametersIVF(nprobe=min(nprobe, idx.nlist))
    return None


def ivf_nprobe_for(index: Any, options: IndexOptions) -> int:
    """The nprobe a search of ``index`` uses (16 when it is no IVF index)."""
    idx: Any = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        idx = faiss.downcast_index(idx.base_index)
    nlist = int(idx.nlist) if isinstance(idx, faiss.IndexIVF) else 0
    return resolve_search(options, int(index.ntotal), nlist).ivf_nprobe


@dataclass
class IndexHandle:
    """A loaded segment index: the CPU copy and, when on a GPU, the GPU copy (owned by the GPU thread)."""

    cpu: Any
    gpu: Any = None


class SearchExecutor:
    """Runs FAISS searches. CPU: in the caller's thread (FAISS CPU search is thread-safe).
    GPU (``faiss.get_num_gpus() > 0`` and ``options.use_gpu`` not False): indexes are copied with
    ``index_cpu_to_gpu`` and every GPU call runs on one owning thread. Use :func:`get_executor` to share one
    per device. ``index_cpu_to_all_gpus`` is never used (it returns an empty index when there is no GPU)."""

    def __init__(self, options: IndexOptions) -> None:
        ngpu = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        if options.use_gpu and ngpu == 0:
            raise InvalidInputError("use_gpu=True but faiss sees no GPU (faiss-cpu installed, or no device)")
        self.on_gpu = ngpu > 0 and options.use_gpu is not False
        self.device = options.gpu_device
        self._pool: ThreadPoolExecutor | None = None
        self._res: Any = None
        if self.on_gpu:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"faiss-gpu{self.device}")

    def _run(self, fn: Callable[[], _T]) -> _T:
        assert self._pool is not None
        return self._pool.submit(fn).result()

    def prepare(self, cpu_index: Any, options: IndexOptions) -> IndexHandle:
        """Wrap a loaded CPU index; on a GPU, also copy it there (kept on the CPU if that type can't)."""
        if not self.on_gpu:
            return IndexHandle(cpu_index)

        def to_gpu() -> Any:
            if self._res is None:
                self._res = faiss.StandardGpuResources()
            co = faiss.GpuClonerOptions()
            co.useFloat16 = False
            try:
                gpu = faiss.index_cpu_to_gpu(self._res, self.device, cpu_index, co)
            except RuntimeError as exc:  # e.g. HNSW has no GPU version
                log.info("index %s stays on the CPU: %s", type(cpu_index).__name__, str(exc).splitlines()[0])
                return None
            try:
                ps = faiss.GpuParameterSpace()
                ps.initialize(gpu)
                ps.set_index_parameter(gpu, "nprobe", ivf_nprobe_for(cpu_index, options))
            except (RuntimeError, AttributeError):
                pass
            return gpu

        return IndexHandle(cpu_index, self._run(to_gpu))

    def search(
        self, handle: IndexHandle, queries: np.ndarray, k: int, options: IndexOptions
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], positions int64 [q, k]; -1 where none)."""
        if handle.gpu is not None and k <= GPU_MAX_K:
            gpu = handle.gpu
            return self._run(lambda: gpu.search(queries, k))
        params = search_params(handle.cpu, k, options)
        if params is None:
            return handle.cpu.search(queries, k)
        return handle.cpu.search(queries, k, params=params)

    def release(self, handle: IndexHandle) -> None:
        """Drop the GPU copy (in the owning thread)."""
        if handle.gpu is not None and self._pool is not None:
            gpu = handle.gpu
            handle.gpu = None
            self._run(lambda: gpu.reset() if hasattr(gpu, "reset") else None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_executors: dict[tuple[bool, int], SearchExecutor] = {}
_executors_lock = threading.Lock()


def get_executor(options: IndexOptions) -> SearchExecutor:
    """The process-wide executor for ``options``' device choice (one GPU thread per device)."""
    ngpu = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if options.use_gpu and ngpu == 0:
        raise InvalidInputError("use_gpu=True but faiss sees no GPU (faiss-cpu installed, or no device)")
    gpu = ngpu > 0 and options.use_gpu is not False
    key = (gpu, options.gpu_device if gpu else -1)
    with _executors_lock:
        ex = _executors.get(key)
        if ex is None:
            ex = SearchExecutor(options)
            _executors[key] = ex
        return ex
