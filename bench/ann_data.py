"""Data and measurement helpers of ``bench/ann.py`` (importable by other benchmarks, e.g. ``bench/gpu.py``):
clustered synthetic vectors (a Gaussian mixture on the sphere), recall@k, exact top-k, clip-retrieval-layout
shards, and the machine/version record every result JSON carries."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
K = 10


def _mixture(dim: int, centres: int, seed: int, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit centres [c, d], noise spectrum [d] with sum of squares 1, random orthogonal basis [d, d])."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    spec = (np.arange(1, dim + 1, dtype=np.float64) ** -alpha).astype(np.float64)
    spec /= np.sqrt((spec**2).sum())
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return c, spec.astype(np.float32), q.astype(np.float32)


def iter_clustered(
    n: int,
    dim: int,
    seed: int = 0,
    *,
    centres: int = 2048,
    spread: float = 0.75,
    alpha: float = 0.5,
    mixture_seed: int = 12345,
    block: int = 65536,
) -> Iterator[np.ndarray]:
    """:func:`clustered_vectors` in blocks of ``block`` rows (float32, L2-normalised), for sizes that should
    not sit in memory twice. The mixture (centres, spectrum, basis) depends only on ``mixture_seed`` and the
    shape arguments, so draws with different ``seed`` (items vs queries) come from the same distribution."""
    cent, spec, basis = _mixture(dim, centres, mixture_seed, alpha)
    for b, start in enumerate(range(0, n, block)):
        m = min(block, n - start)
        rng = np.random.default_rng([seed, b])
        which = rng.integers(0, centres, m)
        noise = (rng.standard_normal((m, dim)).astype(np.float32) * spec) @ basis
        x = cent[which] + spread * noise
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_vectors(
    n: int, dim: int, seed: int = 0, *, centres: int = 2048, spread: float = 0.75, alpha: float = 0.5
) -> np.ndarray:
    """``n`` clustered unit vectors [n, dim] (float32): a Gaussian mixture on the sphere with ``centres``
    random unit centres; a point is its centre plus ``spread`` × noise whose variance decays like
    ``i**-2·alpha`` along a random orthogonal basis (so a cluster has a few dominant directions, like real
    embeddings), then L2-normalised. ``spread`` 0.75 puts a point at cosine ~0.8 from its centre. Queries:
    the same call with another ``seed``."""
    return np.concatenate(
        list(iter_clustered(n, dim, seed, centres=centres, spread=spread, alpha=alpha)), axis=0
    ).reshape(n, dim)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = K) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k (ids; -1 entries never match)."""
    f, t = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    if f.shape[0] != t.shape[0]:
        raise ValueError(f"found has {f.shape[0]} rows, truth {t.shape[0]}")
    if f.shape[0] == 0:
        return float("nan")
    hits = sum(len(np.intersect1d(a[a >= 0], b)) for a, b in zip(f, t, strict=True))
    return hits / (k * f.shape[0])


def exact_top_k(base: Iterator[np.ndarray], queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact inner-product top-``k`` row numbers over the blocks of ``base`` (FAISS flat, blockwise)."""
    import faiss

    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for blk in base:
        index = faiss.IndexFlatIP(blk.shape[1])
        index.add(np.ascontiguousarray(blk, np.float32))
        s, i = index.search(queries, k)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.where(i >= 0, i + offset, -1)], axis=1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(s_all, order, axis=1)
        best_i = np.take_along_axis(i_all, order, axis=1)
        offset += blk.shape[0]
    return best_i


# -- shards in clip-retrieval's layout ------------------------------------------------------------------
def encoder_info(dim: int) -> Any:
    """A ModelInfo naming the synthetic "model" that made the vectors (recorded in the manifest)."""
    from alignfuse.models.base import ModelInfo, Preprocess

    sha = hashlib.sha256(f"bench-ann-gaussian-mixture-{dim}".encode()).hexdigest()
    return ModelInfo(
        spec=f"bench:clustered-{dim}",
        family="synthetic",
        arch="gaussian-mixture",
        weights="none",
        weights_sha256=sha,
        embed_dim=dim,
        preprocess=Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )


def write_shards(root: Path, n: int, dim: int, shard_rows: int, seed: int = 0, **mix: Any) -> None:
    """What ``clip-retrieval inference`` writes for ``n`` images: fp16 ``img_emb_<k>.npy`` and
    ``metadata_<k>.parquet`` (``image_path``), ``k`` zero-padded like its writer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = -(-n // shard_rows)
    width = len(str(shards))
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    row = 0
    buf: list[np.ndarray] = []
    k = 0

    def flush(vecs: np.ndarray) -> None:
        nonlocal row, k
        name = str(k).zfill(width)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", vecs.astype(np.float16))
        paths = [f"synthetic/{i:08d}.jpg" for i in range(row, row + len(vecs))]
        pq.write_table(pa.table({"image_path": paths}), root / "metadata" / f"metadata_{name}.parquet")
        row += len(vecs)
        k += 1

    pending = 0
    for blk in iter_clustered(n, dim, seed, **mix):
        buf.append(blk)
        pending += len(blk)
        while pending >= shard_rows:
            allv = np.concatenate(buf)
            flush(allv[:shard_rows])
            buf, pending = [allv[shard_rows:]], len(allv) - shard_rows
    if pending:
        flush(np.concatenate(buf))


def shard_vectors(root: Path) -> Iterator[np.ndarray]:
    """The imported vectors as the collection stores them (fp16 → float32, re-normalised), shard by shard."""
    for p in sorted((root / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1])):
        v = np.load(p).astype(np.float32)
        yield v / np.linalg.norm(v, axis=1, keepdims=True)


# -- measurements in child processes --------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import faiss

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        pkg = version("alignfuse")
    except Exception:  # not installed: fine for a benchmark
        pkg = "unknown"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "alignfuse": pkg,
        "threads": 1,
    }
