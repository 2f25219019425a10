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
