"""The FAISS section of ``bench/gpu.py``: exact search on the GPU (faiss-gpu Flat, and a plain torch matmul +
top-k on the same device as a labelled stand-in) against the CPU (faiss Flat and the index
``alignfuse.index.options.choose_index_key`` picks), queries/s at batch 1 and 64 and recall@10 against exact
search, on clustered synthetic vectors; each against its roofline ceiling (2·N·d FLOPs and N·d·4 bytes per
exact batch; distance computations × d for a graph/IVF index)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from ann import clustered_vectors, recall_at_k  # bench/ann.py: the ANN benchmark's data and recall
from gpu_common import Budget, Ceiling

K = 10


@dataclass(frozen=True)
class FaissSizes:
    n: int  # database vectors
    dim: int
    clusters: int
    queries: int  # batch-64 queries (recall is measured on these)
    queries_b1: int  # batch-1 queries (time-capped)
    auto_count: int  # the collection size choose_index_key is asked about
    cap_s: float  # time cap of each timing loop


Search = Callable[[np.ndarray], np.ndarray]  # queries [b, d] float32 -> ids [b, K]


def _qps(search: Search, xq: np.ndarray, batch: int, count: int, cap_s: float) -> tuple[float, np.ndarray]:
    """Queries/s over the first ``count`` queries in batches of ``batch`` (stopping after ``cap_s``, at least
    one batch), and the ids found."""
    found, done, stop = [], 0, time.perf_counter() + cap_s
    t0 = time.perf_counter()
    for s in range(0, count, batch):
        found.append(search(xq[s : s + batch]))
        done += len(found[-1])
        if time.perf_counter() > stop:
            break
    return done / (time.perf_counter() - t0), np.concatenate(found)


# queries searched -> (FLOPs per query, bytes per query, whether a batch shares those bytes), or None
Work = Callable[[int], tuple[float, float, bool] | None]


def _row(engine: str, where: str, search: Search, xq: np.ndarray, truth: np.ndarray | None, sz: FaissSizes,
         budget: Budget, ceiling: Ceiling | None, work: Work, reset: Callable[[], None] = lambda: None) -> dict:  # fmt: skip
    """Time one engine: batch 64 over every query (recall), batch 1 over ``queries_b1``; ``work`` gives the
    (FLOPs, bytes) of one query, counted over the batch-64 run (``reset`` before it)."""
    search(xq[:64])  # warm-up
    reset()
    q64, ids = _qps(search, xq, 64, len(xq), sz.cap_s)
    flops_bytes = work(len(ids))
    q1, _ = _qps(search, xq, 1, sz.queries_b1, sz.cap_s) if budget.left() > sz.cap_s * 2 else (None, None)
    row: dict[str, Any] = {"engine": engine, "device": where, "qps_b64": q64, "qps_b1": q1}
    row["recall_at_10"] = None if truth is None else recall_at_k(ids, truth[: len(ids)])
    if flops_bytes is not None and ceiling is not None:
        flops, nbytes, shared = flops_bytes
        row["flops_per_query"], row["bytes_per_query_b1"] = flops, nbytes
        row["distances_per_query"] = flops / (2.0 * sz.dim)
        for b, q in ((64, q64), (1, q1)):
            c = ceiling.items_per_s(flops, "fp32", nbytes / b if shared else nbytes)
            row[f"ceiling_qps_b{b}"] = c
            row[f"ceiling_ratio_b{b}"] = None if q is None else q / c
    print(f"  {engine:<44} {where:<5} b64 {q64:10.1f} q/s  b1 {q1 or 0:9.1f} q/s  recall@10 "
          f"{row['recall_at_10'] if row['recall_at_10'] is not None else float('nan'):.3f}", flush=True)  # fmt: skip
    return row


def _flat_work(n: int, dim: int) -> Work:
    """Exact search: 2·n·d FLOPs per query; the n·d·4 bytes of the vectors are read once per batch."""
    return lambda nq: (2.0 * n * dim, 4.0 * n * dim, True)


_STATS = ("hnsw_stats", "indexIVF_stats")


def _reset_stats(faiss: Any) -> None:
    for name in _STATS:
        st = getattr(faiss.cvar, name, None)
        if st is not None:
            st.reset()


def _ndis_work(faiss: Any, dim: int) -> Work:
    """FLOPs/bytes per query of a graph or IVF index from FAISS's distance counters (refine distances are
    not counted); None when the index keeps no such counter."""

    def work(nq: int) -> tuple[float, float, bool] | None:
        ndis = sum(int(getattr(getattr(faiss.cvar, n, None), "ndis", 0) or 0) for n in _STATS)
        if not ndis or not nq:
            return None
        return 2.0 * dim * ndis / nq, 4.0 * dim * ndis / nq, False  # each query reads its own vectors

    return work


def run_faiss(sz: FaissSizes, device: torch.device, budget: Budget, ceilings: dict[str, Ceiling],
              fake_gpu: bool, index_key: str | None) -> dict[str, Any]:  # fmt: skip
    """The whole section; every step checks the budget. ``fake_gpu`` runs the faiss-gpu branch with CPU
    objects (only ``index_cpu_to_gpu`` is left out), to test it where there is no GPU. Without faiss at all,
    only the torch stand-in runs (its own results are then the ground truth)."""
    out: dict[str, Any] = {
        "sizes": asdict(sz),
        "data": "bench/ann.py clustered_vectors: a Gaussian mixture on the sphere (queries: other draws); "
        "inner product",
        "rows": [],
    }
    faiss: Any = None
    try:
        import faiss
    except ImportError as exc:
        out["note"] = f"faiss is not importable ({exc}): install the `gpu` extra (make bench-gpu does)"
        budget.skip("faiss rows (faiss-gpu, faiss CPU)", out["note"])
    ngpu = 0
    if faiss is not None:
        ngpu = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        out.update(
            faiss_version=faiss.__version__,
            faiss_num_gpus=ngpu,
            faiss_has_gpu_api=hasattr(faiss, "StandardGpuResources"),
            faiss_omp_threads=int(faiss.omp_get_max_threads()),
        )
        if ngpu == 0:
            out["note"] = (
                "the installed faiss has no GPU (faiss.get_num_gpus() == 0): faiss-cpu, or a GPU it cannot see"
            )
            fake = " (--faiss-fake-gpu: run on CPU objects)" if fake_gpu else ""
            print(f"NOTE: {out['note']}. faiss-gpu rows are skipped{fake}.", flush=True)
    est_gen = sz.n * sz.dim * 4 / 0.1e9 + 1.0  # ~0.1 GB/s of generated vectors
    if not budget.allow("faiss: generate vectors", est_gen + 4 * sz.cap_s):
        return out
    t0 = time.perf_counter()
    xb = clustered_vectors(sz.n, sz.dim, seed=1, centres=sz.clusters)
    xq = clustered_vectors(sz.queries, sz.dim, seed=2, centres=sz.clusters)
    out["generate_s"] = time.perf_counter() - t0
    rows: list[dict[str, Any]] = out["rows"]
    truth: np.ndarray | None = None
    out["ground_truth"] = "faiss CPU Flat" if faiss is not None else "the torch stand-in's own exact results"
    if faiss is not None:  # 1. CPU Flat: exact; its results are the ground truth
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(sz.dim)
        flat.add(xb)
        out["cpu_flat_add_s"] = time.perf_counter() - t0
        truth = flat.search(xq, K)[1]
        rows.append(_row("faiss Flat", "cpu", lambda q: flat.search(q, K)[1], xq, truth, sz, budget,
                         ceilings.get("cpu"), _flat_work(sz.n, sz.dim)))  # fmt: skip
        if (ngpu > 0 or fake_gpu) and budget.allow("faiss-gpu Flat", 3 * sz.cap_s + 5):
            rows.append(_faiss_gpu(faiss, flat, ngpu, xq, truth, sz, budget, ceilings))
        elif ngpu == 0 and not fake_gpu:
            budget.skip("faiss-gpu Flat", out["note"])
    if budget.allow(f"torch Flat on {device.type}", 3 * sz.cap_s + 5):
        rows.append(_torch_flat(device, xb, xq, truth, sz, budget, ceilings))
    if faiss is not None and truth is not None:
        # 4. the CPU's automatic choice, built by the project's own code, in a thread the budget can abandon
        _auto(faiss, sz, xb, xq, truth, budget, ceilings.get("cpu"), out, index_key)
    return out


def _faiss_gpu(faiss: Any, flat: Any, ngpu: int, xq: np.ndarray, truth: np.ndarray, sz: FaissSizes,
               budget: Budget, ceilings: dict[str, Ceiling]) -> dict[str, Any]:  # fmt: skip
    """faiss-gpu Flat; the transfer to the GPU is timed and counts against the budget."""
    t0 = time.perf_counter()
    res: Any = None
    gindex: Any = flat  # --faiss-fake-gpu: the same calls on the CPU object
    if ngpu > 0:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = False  # exact fp32, as on the CPU
        gindex = faiss.index_cpu_to_gpu(res, 0, flat, co)
    gindex.search(xq[:1], K)
    transfer_s = time.perf_counter() - t0
    where = "cuda" if ngpu > 0 else "cpu"
    engine = "faiss-gpu Flat" if ngpu > 0 else "faiss-gpu Flat (fake: CPU objects)"
    row = _row(engine, where, lambda q: gindex.search(q, K)[1], xq, truth, sz, budget, ceilings.get(where),
               _flat_work(sz.n, sz.dim))  # fmt: skip
    row["transfer_s"] = transfer_s
    return row


def _torch_flat(device: torch.device, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray | None,
                sz: FaissSizes, budget: Budget, ceilings: dict[str, Ceiling]) -> dict[str, Any]:  # fmt: skip
    """Exact search as a torch matmul + top-k on the benchmark device (fp32, queries in and ids out through
    the host): what a GPU gives without faiss-gpu. Without faiss its own results are the ground truth."""
    t0 = time.perf_counter()
    xb_t = torch.from_numpy(xb).to(device)

    def search(q: np.ndarray) -> np.ndarray:
        scores = torch.from_numpy(q).to(device) @ xb_t.T
        return scores.topk(K, dim=1).indices.cpu().numpy()

    search(xq[:1])
    transfer_s = time.perf_counter() - t0
    if truth is None:
        truth = np.concatenate([search(xq[s : s + 64]) for s in range(0, len(xq), 64)])
    row = _row("torch matmul+topk Flat (stand-in)", device.type, search, xq, truth, sz, budget,
               ceilings.get(device.type), _flat_work(sz.n, sz.dim))  # fmt: skip
    row["transfer_s"] = transfer_s
    if device.type == "cuda":
        del xb_t
        torch.cuda.empty_cache()
    return row


def _auto(faiss: Any, sz: FaissSizes, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, budget: Budget,
          ceiling: Ceiling | None, out: dict[str, Any], index_key: str | None) -> None:  # fmt: skip
    from alignfuse.index.ann import build_index, effective_index_key, search_params
    from alignfuse.index.options import IndexOptions, choose_index_key

    opts = IndexOptions()
    chosen = index_key or choose_index_key(sz.auto_count, sz.dim, opts.memory_budget_bytes)
    key = effective_index_key(chosen, sz.n, sz.dim)
    out["auto"] = {
        "asked_count": sz.auto_count,
        "chosen_key": chosen,
        "built_key": key,
        "override": index_key,
    }
    reserve = 4 * sz.cap_s + 5  # its searches
    if budget.left() <= reserve:
        budget.skip(f"CPU auto index {key}", "no budget left to build it")
        return
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["index"] = build_index(xb, key, opts)
        except Exception as exc:  # reported in the JSON, not fatal to the other sections
            box["error"] = repr(exc)

    t0 = time.perf_counter()
    th = threading.Thread(target=build, daemon=True, name="faiss-build")
    th.start()
    th.join(timeout=budget.left() - reserve)
    build_s = time.perf_counter() - t0
    if th.is_alive():  # FAISS releases the GIL: the build goes on in the background, the process exits anyway
        budget.skip(f"CPU auto index {key}", f"build still running after {build_s:.0f} s (budget)")
        out["auto"]["build_s_at_least"] = build_s
        return
    if "error" in box:
        out["auto"]["error"] = box["error"]
        return
    index = box["index"]
    params = search_params(index, K, opts)

    def search(q: np.ndarray) -> np.ndarray:
        return index.search(q, K, params=params)[1]

    row = _row(f"faiss {key} (auto choice)", "cpu", search, xq, truth, sz, budget, ceiling,
               _ndis_work(faiss, sz.dim), lambda: _reset_stats(faiss))  # fmt: skip
    row["build_s"] = build_s
    row["search_params"] = _describe(params)
    out["rows"].append(row)


def _describe(params: Any) -> dict[str, Any] | None:
    """efSearch / nprobe / k_factor of FAISS search parameters (nested for a refine index)."""
    if params is None:
        return None
    d: dict[str, Any] = {"type": type(params).__name__}
    for name in ("efSearch", "nprobe", "k_factor"):
        if hasattr(params, name):
            d[name] = getattr(params, name)
    base = getattr(params, "base_index_params", None)
    if base is not None:
        d["base"] = _describe(base)
    return d
