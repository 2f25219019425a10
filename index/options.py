"""Index settings (a frozen dataclass) and the pure index-choice function."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from alignfuse.errors import InvalidInputError

GiB = 1 << 30

# Thresholds of :func:`choose_index_key` (documented in its docstring; tests read them).
FLAT_MAX_COUNT = 50_000
HNSW_MAX_COUNT = 2_000_000
HNSW_M = 32
#: segments of one size tier (sizes within a factor of MERGE_FACTOR) that trigger an automatic merge
MERGE_FACTOR = 10


@dataclass(frozen=True)
class IndexOptions:
    """How a collection's FAISS indexes are chosen, built, loaded and searched.

    ``index_key``: a FAISS factory string (``"Flat"``, ``"HNSW32"``, ``"IVF1024,PQ64x8,RFlat"``...) or None
    to let :func:`choose_index_key` pick one from the collection size, dimension and ``memory_budget_bytes``.
    ``use_gpu``: None = automatic (GPU when ``faiss.get_num_gpus() > 0``), False = never, True = require.
    ``mmap``: memory-map FAISS indexes on load (``IO_FLAG_MMAP_IFC`` for Flat/HNSW, ``IO_FLAG_MMAP`` for
    IVF); embeddings are always opened with ``np.load(mmap_mode="r")``.
    ``hnsw_ef_search``, ``ivf_nprobe``, ``refine_k_factor``: search parameters; None (the default) takes
    them from :func:`search_recipe` for each index's size, so they are part of the chosen index recipe.
    ``merge_factor``: after a commit, when ``merge_factor`` segments share a size tier they are merged into
    one (:func:`plan_merge`); 0 turns automatic merges off (then run ``compact``).
    ``train_sample``: at most this many vectors (a seeded random sample) train IVF/PQ quantizers
    (at least 50 per centroid are used when available).
    """

    index_key: str | None = None
    memory_budget_bytes: int = 4 * GiB
    use_gpu: bool | None = None
    gpu_device: int = 0
    mmap: bool = False
    hnsw_ef_search: int | None = None
    hnsw_ef_construction: int = 80
    ivf_nprobe: int | None = None
    refine_k_factor: float | None = None
    train_sample: int = 200_000
    seed: int = 1234
    merge_factor: int = MERGE_FACTOR

    def __post_init__(self) -> None:
        if self.memory_budget_bytes <= 0:
            raise InvalidInputError("memory_budget_bytes must be positive")
        for name in ("hnsw_ef_search", "ivf_nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInputError(f"{name} must be >= 1 (or None: the index's search recipe)")
        if self.refine_k_factor is not None and self.refine_k_factor < 1:
            raise InvalidInputError("refine_k_factor must be >= 1 (or None: the index's search recipe)")
        if self.train_sample < 1:
            raise InvalidInputError("train_sample must be >= 1")
        if self.merge_factor != 0 and self.merge_factor < 2:
            raise InvalidInputError("merge_factor must be 0 (no automatic merges) or >= 2")
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


@dataclass(frozen=True)
class SearchRecipe:
    """Search parameters of an index, the second half of its recipe (:func:`search_recipe`)."""

    hnsw_ef_search: int
    ivf_nprobe: int
    refine_k_factor: float


def search_recipe(count: int, nlist: int = 0) -> SearchRecipe:
    """Search parameters for an index over ``count`` vectors (``nlist`` inverted lists when IVF). Pure.

    * HNSW ``efSearch``: 64 up to 200k vectors, 128 up to 2M, 256 beyond (the candidate list a greedy graph
      search needs grows slowly with the graph; recall@10 ≥ 0.95 on clustered 256/512-d data, measured by
      ``bench/ann.py``).
    * IVF ``nprobe``: 1/32 of the lists, at least 16 and at most 256 (and never more than ``nlist``): with
      about 4·sqrt(n) lists that scans ~3% of the vectors.
    * refine ``k_factor``: 10 (re-rank 10·k PQ candidates with the exact/8-bit copy).
    """
    if count < 0 or nlist < 0:
        raise InvalidInputError(f"search_recipe needs count >= 0 and nlist >= 0 (got {count}, {nlist})")
    if count <= 200_000:
        ef = 64
    elif count <= HNSW_MAX_COUNT:
        ef = 128
    else:
        ef = 256
    nprobe = max(16, min(256, nlist // 32)) if nlist else 16
    if nlist:
        nprobe = min(nprobe, nlist)
    return SearchRecipe(hnsw_ef_search=ef, ivf_nprobe=nprobe, refine_k_factor=10.0)


def resolve_search(options: IndexOptions, count: int, nlist: int = 0) -> SearchRecipe:
    """``options``' explicit search parameters, the recipe's for the rest."""
    r = search_recipe(count, nlist)
    return SearchRecipe(
        hnsw_ef_search=options.hnsw_ef_search if options.hnsw_ef_search is not None else r.hnsw_ef_search,
        ivf_nprobe=options.ivf_nprobe if options.ivf_nprobe is not None else r.ivf_nprobe,
        refine_k_factor=(
            options.refine_k_factor if options.refine_k_factor is not None else r.refine_k_factor
        ),
    )


def size_tier(size: int, factor: int = MERGE_FACTOR) -> int:
    """floor(log_factor(size)) in integers (0 for sizes below ``factor``)."""
    tier = 0
    while size >= factor:
        size //= factor
        tier += 1
    return tier


def plan_merge(sizes: Sequence[int], factor: int = MERGE_FACTOR) -> list[int]:
    """The segments to merge after a commit (positions in ``sizes``), or [] when none. Pure.

    A logarithmic tiered policy (Lucene's LogMergePolicy, simplified): a segment of ``s`` vectors is in tier
    floor(log_factor(s)); when ``factor`` or more segments share a tier, the lowest such tier's segments are
    merged into one (of the next tier). So a collection holds at most ``factor - 1`` segments per tier,
    about ``(factor - 1)·log_factor(N)`` in all however many adds made it, a vector is rewritten about once
    per tier (O(log N) times in its life: adds stay O(M) amortised), and a merge costs the size of the
    small segments it merges, never the collection's. ``factor`` 0 (or 1) disables merging.
    """
    if factor < 2:
        return []
    tiers: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        tiers.setdefault(size_tier(size, factor), []).append(i)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= factor:
            return tiers[tier]
    return []
