"""Index choice (pure function), IndexOptions, FAISS index building / loading / searching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignfuse.errors import InvalidInputError
from alignfuse.index.ann import (
    build_index,
    effective_index_key,
    get_executor,
    load_index,
    min_train_count,
    save_index,
    search_params,
    validate_index_key,
)
from alignfuse.index.options import GiB, IndexOptions, choose_index_key

from .conftest import clustered


@pytest.mark.parametrize(
    ("count", "dim", "budget", "expected"),
    [
        (0, 512, 4 * GiB, "Flat"),
        (1_000, 512, 4 * GiB, "Flat"),
        (50_000, 512, 4 * GiB, "Flat"),
        (50_001, 512, 4 * GiB, "HNSW32"),
        (1_000_000, 512, 4 * GiB, "HNSW32"),
        (2_000_000, 256, 4 * GiB, "HNSW32"),
        # large, flat vectors still fit: IVF over flat lists (nlist ~ 4 sqrt(n), power of two)
        (3_000_000, 256, 8 * GiB, "IVF8192,Flat"),
        # memory tight: PQ codes + an 8-bit refine copy
        (10_000_000, 512, 8 * GiB, "IVF16384,PQ64x8,Refine(SQ8)"),
        # very tight: PQ only
        (10_000_000, 512, 2 * GiB, "IVF16384,PQ64x8"),
        # medium count but a budget too small for HNSW's graph + vectors
        (1_000_000, 512, 1 * GiB, "IVF4096,PQ64x8,Refine(SQ8)"),
        # small count but flat does not fit: falls through the tiers
        (40_000, 768, 64 << 20, "IVF1024,PQ96x8,Refine(SQ8)"),
        (40_000, 768, 20 << 20, "IVF1024,PQ96x8"),
    ],
)
def test_choose_index_key_table(count: int, dim: int, budget: int, expected: str) -> None:
    assert choose_index_key(count, dim, budget) == expected


def test_choose_index_key_keys_are_valid_faiss_strings() -> None:
    for count in (10, 100_000, 3_000_000, 50_000_000):
        for dim in (64, 512, 768):
            for budget in (64 << 20, 1 * GiB, 16 * GiB):
                key = choose_index_key(count, dim, budget)
                assert validate_index_key(key, dim) == key


def test_choose_index_key_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidInputError):
        choose_index_key(-1, 64, GiB)
    with pytest.raises(InvalidInputError):
        choose_index_key(10, 0, GiB)
    with pytest.raises(InvalidInputError):
        choose_index_key(10, 64, 0)


def test_index_options_frozen_and_validated() -> None:
    o = IndexOptions()
    with pytest.raises(AttributeError):
        o.mmap = True  # type: ignore[misc]
    with pytest.raises(InvalidInputError):
        IndexOptions(memory_budget_bytes=0)
    with pytest.raises(InvalidInputError):
        IndexOptions(index_key="  ")


def test_validate_index_key() -> None:
    assert validate_index_key(" HNSW16 ") == "HNSW16"
    with pytest.raises(InvalidInputError, match="Bogus"):
        validate_index_key("Bogus")
    with pytest.raises(InvalidInputError, match="IDMap"):
        validate_index_key("IDMap2,Flat")


def test_effective_key_falls_back_to_flat_when_too_few_to_train() -> None:
    assert min_train_count("Flat") == 0
    assert min_train_count("IVF64,PQ8x8,RFlat") == 39 * 256
    assert effective_index_key("IVF64,PQ8x8,RFlat", 500, 32) == "Flat"
    assert effective_index_key("IVF64,PQ8x8,RFlat", 20_000, 32) == "IVF64,PQ8x8,RFlat"
    assert effective_index_key("HNSW32", 5, 32) == "HNSW32"


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize(
    ("key", "min_recall"),
    [
        ("Flat", 0.999),
        ("HNSW32", 0.95),
        ("IVF32,Flat", 0.9),
        ("IVF32,PQ8x6,RFlat", 0.9),
        ("IVF32,PQ8x6,Refine(SQ8)", 0.6),
        ("IVF32,PQ8x6", 0.15),  # codes only: approximate, but far above chance (10/6000)
    ],
)
def test_index_types_build_and_search_with_sane_recall(key: str, min_recall: float, tmp_path: Path) -> None:
    data = clustered(6_050, 16, seed=1)  # queries drawn around the same centres as the data
    x, q = data[:6_000], data[6_000:]
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    opts = IndexOptions(ivf_nprobe=8, hnsw_ef_search=64, refine_k_factor=16)
    index = build_index(x, key, opts)
    assert index.ntotal == len(x)
    # round trip through a file, memory-mapped
    save_index(index, tmp_path / "ix.faiss")
    loaded = load_index(
        tmp_path / "ix.faiss",
        key,
        IndexOptions(mmap=True, ivf_nprobe=8, hnsw_ef_search=64, refine_k_factor=16),
    )
    ex = get_executor(opts)
    handle = ex.prepare(loaded, opts)
    _, found = ex.search(handle, q, 10, opts)
    assert _recall(found, truth) >= min_recall
    if key != "Flat":
        assert search_params(loaded, 10, opts) is not None


def test_build_index_trains_on_a_sample(tmp_path: Path) -> None:
    x = clustered(5_000, 16, seed=3)
    index = build_index(x, "IVF32,Flat", IndexOptions(train_sample=2_000))
    assert index.is_trained and index.ntotal == 5_000


def test_executor_runs_on_cpu_without_gpu() -> None:
    import faiss

    opts = IndexOptions()
    ex = get_executor(opts)
    assert ex.on_gpu == (faiss.get_num_gpus() > 0)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(InvalidInputError, match="GPU"):
            get_executor(IndexOptions(use_gpu=True)).on_gpu  # noqa: B018


# -- search parameters are part of the index recipe ------------------------------------------------------
def test_search_recipe_table_and_bounds() -> None:
    from alignfuse.index.options import search_recipe

    assert search_recipe(1_000).hnsw_ef_search == 64
    assert search_recipe(200_000).hnsw_ef_search == 64
    assert search_recipe(1_000_000).hnsw_ef_search == 128
    assert search_recipe(10_000_000).hnsw_ef_search == 256
    # nprobe: 1/32 of the lists, clamped to [16, 256] and never above nlist
    assert search_recipe(1_000_000, 4096).ivf_nprobe == 128
    assert search_recipe(100_000, 1024).ivf_nprobe == 32
    assert search_recipe(10_000, 256).ivf_nprobe == 16
    assert search_recipe(100, 8).ivf_nprobe == 8
    assert search_recipe(100_000_000, 65536).ivf_nprobe == 256
    assert search_recipe(1_000_000, 4096).refine_k_factor >= 4
    # monotone in the collection size: a bigger collection never searches with a smaller candidate list
    efs = [search_recipe(n).hnsw_ef_search for n in (10, 10**5, 10**6, 10**7, 10**9)]
    assert efs == sorted(efs)
    with pytest.raises(InvalidInputError):
        search_recipe(-1)


def test_explicit_search_options_override_the_recipe() -> None:
    from alignfuse.index.options import resolve_search, search_recipe

    assert resolve_search(IndexOptions(), 1_000_000, 4096) == search_recipe(1_000_000, 4096)
    r = resolve_search(IndexOptions(hnsw_ef_search=40, ivf_nprobe=3, refine_k_factor=2.5), 1_000_000, 4096)
    assert (r.hnsw_ef_search, r.ivf_nprobe, r.refine_k_factor) == (40, 3, 2.5)
    for bad in ({"hnsw_ef_search": 0}, {"ivf_nprobe": 0}, {"refine_k_factor": 0.5}):
        with pytest.raises(InvalidInputError):
            IndexOptions(**bad)  # type: ignore[arg-type]


def test_search_params_follow_each_index_size() -> None:
    """The parameters come from the searched index itself (its size / nlist), unless options set them."""
    import faiss

    x = clustered(12_000, 16, seed=5)
    hnsw = build_index(x, "HNSW16", IndexOptions())
    p = search_params(hnsw, 10, IndexOptions())
    assert p.efSearch == 64  # 12k vectors: the small-collection recipe
    assert search_params(hnsw, 100, IndexOptions()).efSearch == 100  # never below k
    assert search_params(hnsw, 10, IndexOptions(hnsw_ef_search=300)).efSearch == 300
    ivf = build_index(x, "IVF64,PQ8x4,RFlat", IndexOptions())
    p = search_params(ivf, 10, IndexOptions())
    base = faiss.downcast_index(faiss.downcast_index(ivf).base_index)
    assert p.k_factor == 10.0 and search_params(base, 10, IndexOptions()).nprobe == 16
    p = search_params(ivf, 10, IndexOptions(ivf_nprobe=64, refine_k_factor=3))
    assert p.k_factor == 3.0 and search_params(base, 10, IndexOptions(ivf_nprobe=64)).nprobe == 64


# -- merge policy ---------------------------------------------------------------------------------------
def test_plan_merge_is_log_tiered() -> None:
    from alignfuse.index.options import plan_merge, size_tier

    assert [size_tier(s) for s in (0, 9, 10, 999, 1000, 100_000)] == [0, 0, 1, 2, 3, 5]
    assert plan_merge([5_000] * 9) == []  # 9 of a tier: fine
    assert plan_merge([5_000] * 10) == list(range(10))  # the 10th triggers one merge
    assert plan_merge([100_000, 500, 600, 700], 3) == [1, 2, 3]  # the big segment is never rewritten
    assert plan_merge([10] * 10 + [100] * 10) == list(range(10))  # the lowest full tier first
    assert plan_merge([10] * 20, 0) == [] and plan_merge([10] * 20, 1) == []  # off
    with pytest.raises(InvalidInputError):
        IndexOptions(merge_factor=1)


def test_plan_merge_bounds_segments_and_rewrites_over_many_adds() -> None:
    """Simulated adds of 100 items: segments stay O(factor·log N) and each item is rewritten O(log N)
    times (the amortised add cost stays O(M), never O(N) per add)."""
    from alignfuse.index.options import plan_merge

    sizes: list[int] = []
    rewritten = 0
    most = 0
    for _ in range(2_000):  # 200k items
        sizes.append(100)
        while pick := plan_merge(sizes):
            merged = sum(sizes[i] for i in pick)
            rewritten += merged
            sizes = [s for i, s in enumerate(sizes) if i not in set(pick)] + [merged]
        most = max(most, len(sizes))
    assert sum(sizes) == 200_000
    assert most <= 9 * 4 + 1  # tiers 2..5
    assert rewritten / sum(sizes) <= 4  # each item rewritten once per tier at most
