"""Index settings (a frozen dataclass) and the pure index-choice function."""

from __future__ import annotations

import math
from dataclasses import dataclass

from alignfuse.errors import InvalidInputError

GiB = 1 << 30

# Thresholds of :func:`choose_index_key` (documented in its docstring; tests read them).
FLAT_MAX_COUNT = 50_000
HNSW_MAX_COUNT = 2_000_000
HNSW_M = 32


@dataclass(frozen=True)
class IndexOptions:
    """How a collection's FAISS indexes are chosen, built, loaded and searched.

    ``index_key``: a FAISS factory string (``"Flat"``, ``"HNSW32"``, ``"IVF1024,PQ64x8,RFlat"``...) or None
    to let :func:`choose_index_key` pick one from the collection size, dimension and ``memory_budget_bytes``.
    ``use_gpu``: None = automatic (GPU when ``faiss.get_num_gpus() > 0``), False = never, True = require.
    ``mmap``: memory-map FAISS indexes on load (``IO_FLAG_MMAP_IFC`` for Flat/HNSW, ``IO_FLAG_MMAP`` for
    IVF); embeddings are always opened with ``np.load(mmap_mode="r")``.
    ``train_sample``: at most this many vectors (a seeded random sample) train IVF/PQ quantizers
    (at least 50 per centroid are used when available).
    """

    index_key: str | None = None
    memory_budget_bytes: int = 4 * GiB
    use_gpu: bool | None = None
    gpu_device: int = 0
    mmap: bool = False
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 80
    ivf_nprobe: int = 32
    refine_k_factor: float = 10.0
    train_sample: int = 200_000
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.memory_budget_bytes <= 0:
            raise InvalidInputError("memory_budget_bytes must be positive")
        if self.hnsw_ef_search < 1 or self.ivf_nprobe < 1 or self.train_sample < 1:
            raise InvalidInputError("hnsw_ef_search, ivf_nprobe and train_sample must be >= 1")
        if self.index_key is not None and not self.index_key.strip():
            raise InvalidInputError("index_key must not be empty")


def _pow2_nlist(count: int) -> int:
    """About 4·sqrt(count) inverted lists, a power of two in [64, 65536]."""
    target = 4.0 * math.sqrt(max(count, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    return max(64, min(65536, nlist))


def _pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: about dim/8 (8 dimensions per 1-byte code), a divisor of ``dim``."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def estimate_index_bytes(key_family: str, count: int, dim: int) -> int:
    """Rough resident size of an index family (``flat``, ``hnsw``, ``ivfflat``, ``ivfpq_sq8``, ``ivfpq``)."""
    ids = 8 * count
    if key_family == "flat":
        return 4 * dim * count + ids
    if key_family == "hnsw":
        # level-0 links: 2·M int32 per vector (+ ~1/M upper levels), plus the flat vectors
        return 4 * dim * count + int(2 * HNSW_M * 4 * 1.1 * count) + ids
    if key_family == "ivfflat":
        return 4 * dim * count + ids * 2
    m = _pq_m(dim)
    if key_family == "ivfpq_sq8":
        return (m + dim) * count + ids * 2
    if key_family == "ivfpq":
        return m * count + ids * 2
    raise InvalidInputError(f"unknown index family {key_family!r}")


def choose_index_key(count: int, dim: int, memory_budget_bytes: int) -> str:
    """Pick a FAISS factory string for ``count`` vectors of ``dim`` dimensions (inner product metric).

    A pure function, in this order:

    1. ``"Flat"`` (exact) when ``count <= 50_000`` and the flat vectors fit the budget;
    2. ``"HNSW32"`` when ``count <= 2_000_000`` and vectors + graph fit the budget;
    3. ``"IVF{nlist},Flat"`` for larger collections whose flat vectors fit the budget;
    4. ``"IVF{nlist},PQ{m}x8,Refine(SQ8)"`` when memory is tight (PQ codes + an 8-bit refine copy fit);
    5. ``"IVF{nlist},PQ{m}x8"`` otherwise (smallest).

    ``nlist`` is about 4·sqrt(count) as a power of two in [64, 65536]; ``m`` about dim/8 dividing ``dim``.
    """
    if count < 0 or dim <= 0 or memory_budget_bytes <= 0:
        raise InvalidInputError(
            f"choose_index_key needs count >= 0, dim > 0, budget > 0 (got {count}, {dim}, {memory_budget_bytes})"
        )
    if count <= FLAT_MAX_COUNT and estimate_index_bytes("flat", count, dim) <= memory_budget_bytes:
        return "Flat"
    if count <= HNSW_MAX_COUNT and estimate_index_bytes("hnsw", count, dim) <= memory_budget_bytes:
        return f"HNSW{HNSW_M}"
    nlist = _pow2_nlist(count)
    if estimate_index_bytes("ivfflat", count, dim) <= memory_budget_bytes:
        return f"IVF{nlist},Flat"
    m = _pq_m(dim)
    if estimate_index_bytes("ivfpq_sq8", count, dim) <= memory_budget_bytes:
        return f"IVF{nlist},PQ{m}x8,Refine(SQ8)"
    return f"IVF{nlist},PQ{m}x8"
