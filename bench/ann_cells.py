"""What ``bench/ann.py`` runs in a fresh process per measurement (``--child KIND JSON``): build by import,
re-derive by compaction, open + search (peak RSS from ``getrusage``, RSS from ``/proc``)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
from ann_data import K, encoder_info, recall_at_k


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _disk_mb(root: Path, segment_ids: list[str]) -> dict[str, float]:
    """On-disk size of the current version's segments (older versions' files are not counted)."""
    size = {"faiss": 0, "embeddings_npy": 0, "ids_npy": 0}
    for seg in segment_ids:
        for f in (root / "segments" / seg).iterdir():
            if f.suffix == ".faiss":
                size["faiss"] += f.stat().st_size
            elif f.name.endswith(".ids.npy"):
                size["ids_npy"] += f.stat().st_size
            else:
                size["embeddings_npy"] += f.stat().st_size
    out = {k: round(v / 2**20, 1) for k, v in size.items()}
    out["items_sqlite"] = round((root / "items.sqlite").stat().st_size / 2**20, 1)
    return out


def _time_index_builds() -> dict[str, float]:
    """Time the writer's FAISS builds (the real function, wrapped) so build time is reported apart from
    the rest of an import/compaction (reading shards, sqlite rows, copying vectors, fsync)."""
    from alignfuse.index import writer

    spent = {"s": 0.0}
    inner = writer.build_index

    def timed(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            spent["s"] += time.perf_counter() - t

    writer.build_index = timed  # type: ignore[assignment]
    return spent


def _keys(m: Any) -> list[str]:
    return sorted({p.index_key for s in m.segments for _, p in s.parts})


def child_build(a: dict[str, Any]) -> dict[str, Any]:
    """Import the shards into a new collection with index key ``a["key"]`` (None: automatic)."""
    from alignfuse.index import IndexOptions
    from alignfuse.index.collection import Collection
    from alignfuse.index.options import MERGE_FACTOR
    from alignfuse.index.shards import ImportOptions, import_shards

    spent = _time_index_builds()
    # the 1-vs-many run (merge False) measures segments as adds leave them without the merge policy,
    # unless it names a merge_factor
    factor = a.get("merge_factor", MERGE_FACTOR if a["merge"] else 0)
    opts = IndexOptions(index_key=a["key"], memory_budget_bytes=int(a["budget"]), merge_factor=factor)
    t0 = time.perf_counter()
    r = import_shards(
        a["collection"],
        a["shards"],
        encoder=encoder_info(a["dim"]),
        options=ImportOptions(index=opts, merge_at_end=a["merge"]),
    )
    seconds = time.perf_counter() - t0
    root = Path(a["collection"])
    with Collection.open(root, options=IndexOptions(mmap=True)) as c:
        m = c.manifest
        first, last = c.get(1), c.get(a["n"])
        ok = first.uri == "synthetic/00000000.jpg" and last.uri == f"synthetic/{a['n'] - 1:08d}.jpg"
    return {
        "built_by": "import",
        "import_s": round(seconds, 2),
        "index_build_s": round(spent["s"], 2),
        "added": r.added,
        "peak_rss_mb": round(_peak_mb(), 1),
        "segments": len(m.segments),
        "index_keys": _keys(m),
        "ids_match_rows": ok,
        "disk_mb": _disk_mb(root, [sg.id for sg in m.segments]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _qps(c: Any, q: np.ndarray, batch: int, budget_s: float, min_q: int) -> tuple[float, np.ndarray]:
    """Queries/s of ``Collection.search`` at ``batch`` (runs until all queries or ``budget_s``)."""
    c.search(q[:batch], K, "image")  # warm-up
    out = []
    t0 = time.perf_counter()
    done = 0
    for start in range(0, len(q), batch):
        out.append(c.search(q[start : start + batch], K, "image").ids)
        done += len(out[-1])
        if time.perf_counter() - t0 > budget_s and done >= min_q:
            break
    return done / (time.perf_counter() - t0), np.concatenate(out)


def child_search(a: dict[str, Any]) -> dict[str, Any]:
    """Open (mmap or not), then QPS at batch 1 and 64 and recall@10; optional parameter sweep."""
    import faiss

    from alignfuse.index import IndexOptions
    from alignfuse.index.collection import Collection

    faiss.omp_set_num_threads(1)
    q = np.load(a["queries"])
    truth = np.load(a["truth"]) + 1  # item ids are row + 1 (checked at build)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    c = Collection.open(a["collection"], options=IndexOptions(mmap=a["mmap"]))
    open_s = time.perf_counter() - t0
    out: dict[str, Any] = {"mmap": a["mmap"], "open_s": round(open_s, 3)}
    out["rss_after_open_mb"] = round(_rss_mb() - rss0, 1)
    qps1, ids1 = _qps(c, q, 1, a["budget_s"], 20)
    out["qps_b1"] = round(qps1, 1)
    out["recall_b1"] = round(recall_at_k(ids1, truth[: len(ids1)]), 4)
    qps64, ids64 = _qps(c, q, 64, a["budget_s"], 64)
    out["qps_b64"] = round(qps64, 1)
    out["recall_at_10"] = round(recall_at_k(ids64, truth[: len(ids64)]), 4)
    out["queries_b1"], out["queries_b64"] = len(ids1), len(ids64)
    out["rss_after_search_mb"] = round(_rss_mb() - rss0, 1)
    c.close()
    sweep = []
    for params in a.get("sweep", []):
        with Collection.open(a["collection"], options=IndexOptions(mmap=True, **params)) as cs:
            s1, i1 = _qps(cs, q, 1, a["budget_s"] / 2, 20)
            sweep.append(
                {
                    **params,
                    "qps_b1": round(s1, 1),
                    "recall_at_10": round(recall_at_k(i1, truth[: len(i1)]), 4),
                }
            )
    if sweep:
        out["sweep"] = sweep
    out["peak_rss_mb"] = round(_peak_mb(), 1)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def child_compact(a: dict[str, Any]) -> dict[str, Any]:
    """``Collection.compact(key)``: merge all segments and re-derive the FAISS index from the stored
    embeddings (what ``alignfuse compact --index-key`` runs; no re-import, no encoder)."""
    from alignfuse.index import IndexOptions
    from alignfuse.index.collection import Collection

    spent = _time_index_builds()
    root = Path(a["collection"])
    with Collection.open(root, options=IndexOptions(mmap=True)) as c:
        before = len(c.manifest.segments)
        t0 = time.perf_counter()
        c.compact(a.get("key"))
        m = c.manifest
        return {
            "built_by": "compact",
            "compact_s": round(time.perf_counter() - t0, 2),
            "index_build_s": round(spent["s"], 2),
            "peak_rss_mb": round(_peak_mb(), 1),
            "segments_before": before,
            "segments": len(m.segments),
            "segments_after": len(m.segments),
            "index_keys": _keys(m),
            "disk_mb": _disk_mb(root, [sg.id for sg in m.segments]),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }


CHILDREN = {"build": child_build, "search": child_search, "compact": child_compact}
