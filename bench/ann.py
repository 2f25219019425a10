"""ANN at 100k and 1M vectors through the collection layer (import → segments → FAISS → Collection.search).

For each size and dimension (256-d like ALBEF, 512-d like CLIP ViT-B), in one run:

* clustered synthetic vectors: a Gaussian mixture on the sphere (a few thousand unit centres; each point a
  centre plus noise with a decaying spectrum in a random basis, then L2-normalised); queries come from the same
  mixture (other draws), never uniform Gaussian;
* the vectors are written as clip-retrieval inference shards (``img_emb/img_emb_<k>.npy`` fp16 +
  ``metadata/metadata_<k>.parquet`` with ``image_path``) and imported with :func:`index.shards.import_shards`
  (what ``alignfuse import`` runs): no encoder anywhere;
* one collection per index: ``Flat``, ``HNSW32``, ``IVF<nlist>,Flat``, ``IVF<nlist>,PQ<m>x8,RFlat`` and the
  automatic choice (:func:`index.options.choose_index_key`; reused when it equals one of those); each is built
  in its own process (peak RSS from ``getrusage``) and searched in fresh processes, memory-mapped and not:
  open time, RSS after open, queries/s at batch 1 and 64 (one thread), recall@10 against exact search, with a
  small sweep of the search parameter around the collection's recipe (:func:`index.options.search_recipe`);
* 1 vs 20 segments (the same vectors imported as 20 shards without merging, as incremental adds leave them),
  then ``compact()``: QPS and recall before/after and the number of queries after which compaction pays.

Usage::

    python bench/ann.py                       # 100k and 1M at 256+512-d (~47 min on 2 cores, one thread)
    python bench/ann.py --plan 100000:256 --segments 0
    python bench/ann.py --toy                 # seconds: 10k vectors at 32-d (the end-to-end test)

Writes ``bench/results/ann.json`` and ``docs/img/ann.png``. Reusable pieces (e.g. for ``bench/gpu.py``):
:func:`clustered_vectors` (and :func:`iter_clustered` in blocks) and :func:`recall_at_k`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ann_cells import CHILDREN  # noqa: E402
from ann_data import (  # noqa: E402  (re-exported: the reusable pieces live there)
    K,
    clustered_vectors,
    exact_top_k,
    git_commit,
    iter_clustered,
    machine,
    recall_at_k,
    shard_vectors,
    write_shards,
)

__all__ = ["K", "clustered_vectors", "exact_top_k", "iter_clustered", "recall_at_k", "write_shards"]

log = logging.getLogger("bench.ann")
RESULTS = REPO / "bench" / "results"
IMG = REPO / "docs" / "img"


# -- reusable: data and recall --------------------------------------------------------------------------
IN_PROCESS = False  # --toy: run the "children" in this process (seconds instead of minutes of imports)


def run_child(kind: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    if IN_PROCESS:
        return CHILDREN[kind](args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- orchestration --------------------------------------------------------------------------------------
def cell_keys(n: int, dim: int) -> dict[str, str]:
    from alignfuse.index.options import _pow2_nlist, _pq_m

    nlist, m = _pow2_nlist(n), _pq_m(dim)
    return {
        "Flat": "Flat",
        "HNSW": "HNSW32",
        "IVF-Flat": f"IVF{nlist},Flat",
        "IVF-PQ+refine": f"IVF{nlist},PQ{m}x8,RFlat",
    }


def _sweep_for(key: str, n: int, nlist: int) -> list[dict[str, Any]]:
    from alignfuse.index.options import search_recipe

    r = search_recipe(n, nlist)
    if key.startswith("HNSW"):
        return [{"hnsw_ef_search": e} for e in sorted({16, 32, r.hnsw_ef_search // 2, r.hnsw_ef_search * 2})]
    if "PQ" in key:
        return [{"refine_k_factor": f} for f in (2.0, 4.0, 20.0)] + [
            {"ivf_nprobe": max(1, r.ivf_nprobe // 2)},
            {"ivf_nprobe": min(nlist, r.ivf_nprobe * 2)},
        ]
    if key.startswith("IVF"):
        return [
            {"ivf_nprobe": p}
            for p in sorted(
                {max(1, r.ivf_nprobe // 4), max(1, r.ivf_nprobe // 2), min(nlist, r.ivf_nprobe * 2)}
            )
        ]
    return []


def run_size(n: int, dim: int, work: Path, a: argparse.Namespace, save: Any) -> dict[str, Any]:
    """One N×dim run: shards written once, imported once (the first cell), the other indexes re-derived
    from the stored embeddings by ``compact(index_key)``; each cell searched mmap'd and not."""
    from alignfuse.index.options import _pow2_nlist, choose_index_key, search_recipe

    budget = int(a.memory_budget_gb * (1 << 30))
    mix = {"centres": a.centres}
    data = work / f"shards-{n}-{dim}"
    t0 = time.perf_counter()
    write_shards(data, n, dim, max(1, n // a.shards), seed=1, **mix)
    gen_s = time.perf_counter() - t0
    q = clustered_vectors(a.queries, dim, seed=2, **mix)
    t0 = time.perf_counter()
    truth = exact_top_k(shard_vectors(data), q)
    gt_s = time.perf_counter() - t0
    np.save(work / "q.npy", q)
    np.save(work / "truth.npy", truth)
    auto = choose_index_key(n, dim, budget)
    keys = cell_keys(n, dim)
    nlist = _pow2_nlist(n)
    plan: list[tuple[str, str | None]] = [(name, key) for name, key in keys.items() if name in a.cells]
    same = next((name for name, key in keys.items() if key == auto and name in a.cells), None)
    if same is None:
        plan.append(("auto", None))
    cells: dict[str, Any] = {}
    res: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "centres": a.centres,
        "queries": a.queries,
        "shards": a.shards,
        "generate_and_write_shards_s": round(gen_s, 1),
        "exact_truth_s": round(gt_s, 1),
        "keys": keys,
        "auto_key": auto,
        "auto_same_as": same,
        "auto_search_recipe": search_recipe(n, nlist if auto.startswith("IVF") else 0).__dict__,
        "cells": cells,
    }
    coll = work / f"c-{n}-{dim}"
    for i, (name, key) in enumerate(plan):
        log.info("n=%d dim=%d %s (%s): building", n, dim, name, key or f"auto={auto}")
        cell: dict[str, Any] = {"requested_key": key or "auto"}
        if i == 0 or key is None:  # the automatic choice needs a collection created without a key
            shutil.rmtree(coll, ignore_errors=True)
            args = {"collection": str(coll), "shards": str(data), "key": key, "budget": budget, "dim": dim}
            cell["build"] = run_child("build", {**args, "n": n, "merge": True}, a.timeout)
        else:
            cell["build"] = run_child("compact", {"collection": str(coll), "key": key}, a.timeout)
        sargs = {
            "collection": str(coll),
            "queries": str(work / "q.npy"),
            "truth": str(work / "truth.npy"),
            "budget_s": a.search_seconds,
        }
        cell["search"] = run_child("search", {**sargs, "mmap": False}, a.timeout)
        cell["search_mmap"] = run_child(
            "search", {**sargs, "mmap": True, "sweep": _sweep_for(key or auto, n, nlist)}, a.timeout
        )
        log.info("  %s", json.dumps({k: cell[k] for k in ("build", "search")}))
        cells[name] = cell
        _target(res, same)
        save(res)
    if not a.keep:
        shutil.rmtree(coll, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    return res


def _target(res: dict[str, Any], same: str | None) -> None:
    """The issue's target, once Flat and the automatic choice are measured."""
    cells = res["cells"]
    flat = cells.get("Flat", {}).get("search", {}).get("qps_b1")
    auto_cell = cells["auto"] if "auto" in cells else cells.get(same or "", {})
    if flat and auto_cell:
        s = auto_cell["search"]
        res["target"] = {
            "auto_recall_at_10": s["recall_at_10"],
            "auto_speedup_vs_flat_b1": round(s["qps_b1"] / flat, 2),
            "met": bool(s["recall_at_10"] >= 0.95 and s["qps_b1"] >= 10 * flat),
            "rule": "automatic choice: recall@10 >= 0.95 at >= 10x Flat's queries/s at batch 1",
        }


def run_segments(n: int, dim: int, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The same n vectors as ``a.segments`` unmerged segments (automatic keys, as adds leave them) vs one."""
    mix = {"centres": a.centres}
    data = work / f"seg-shards-{n}-{dim}"
    write_shards(data, n, dim, max(1, n // a.segments), seed=1, **mix)
    q = clustered_vectors(a.queries, dim, seed=2, **mix)
    np.save(work / "q.npy", q)
    np.save(work / "truth.npy", exact_top_k(shard_vectors(data), q))
    coll = work / f"seg-{n}-{dim}"
    budget = int(a.memory_budget_gb * (1 << 30))
    build = run_child(
        "build",
        {
            "collection": str(coll),
            "shards": str(data),
            "key": a.segments_key,
            "budget": budget,
            "dim": dim,
            "n": n,
            "merge": False,
        },
        a.timeout,
    )
    sargs = {
        "collection": str(coll),
        "queries": str(work / "q.npy"),
        "truth": str(work / "truth.npy"),
        "budget_s": a.search_seconds,
        "mmap": False,
    }
    many = run_child("search", sargs, a.timeout)
    comp = run_child("compact", {"collection": str(coll)}, a.timeout)
    one = run_child("search", sargs, a.timeout)
    shutil.rmtree(coll, ignore_errors=True)
    # the same adds with the default merge policy (index.options.plan_merge) on
    from alignfuse.index.options import MERGE_FACTOR

    pol = work / f"seg-policy-{n}-{dim}"
    pbuild = run_child(
        "build",
        {
            "collection": str(pol),
            "shards": str(data),
            "key": a.segments_key,
            "budget": budget,
            "dim": dim,
            "n": n,
            "merge": False,
            "merge_factor": MERGE_FACTOR,
        },
        a.timeout,
    )
    policy = {
        "merge_factor": MERGE_FACTOR,
        "build": pbuild,
        "search": run_child("search", {**sargs, "collection": str(pol)}, a.timeout),
    }
    shutil.rmtree(pol, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    saved = 1 / many["qps_b1"] - 1 / one["qps_b1"]
    return {
        "n": n,
        "dim": dim,
        "build": build,
        "many_segments": many,
        "compact": comp,
        "one_segment": one,
        "with_merge_policy": policy,
        "slowdown_b1": round(one["qps_b1"] / many["qps_b1"], 2),
        "slowdown_b64": round(one["qps_b64"] / many["qps_b64"], 2),
        "compaction_pays_after_queries": int(comp["compact_s"] / saved) if saved > 0 else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"Flat": "s", "HNSW": "o", "IVF-Flat": "^", "IVF-PQ+refine": "D", "auto": "*"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, run in enumerate(result["runs"]):
        col = colors[ci % len(colors)]
        for name, cell in run["cells"].items():
            if "search" not in cell:
                continue
            s = cell["search"]
            ax.scatter(
                s["qps_b1"],
                s["recall_at_10"],
                marker=markers.get(name, "x"),
                color=col,
                s=60,
                label=f"{run['n']:,}×{run['dim']} {name}",
            )
            sw = cell.get("search_mmap", {}).get("sweep", [])
            if sw:
                ax.plot([p["qps_b1"] for p in sw], [p["recall_at_10"] for p in sw], ":", color=col, lw=0.8)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s, batch 1, one thread (log)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title("ANN through the collection layer (dotted: parameter sweep)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    seg = result.get("segments")
    if seg:
        labels = [f"{seg['compact']['segments_before']} segments", "1 segment (compacted)"]
        vals = [seg["many_segments"]["qps_b1"], seg["one_segment"]["qps_b1"]]
        vals64 = [seg["many_segments"]["qps_b64"], seg["one_segment"]["qps_b64"]]
        x = np.arange(2)
        bx.bar(x - 0.2, vals, 0.4, label="batch 1")
        bx.bar(x + 0.2, vals64, 0.4, label="batch 64")
        bx.set_xticks(x, labels)
        bx.set_ylabel("queries/s")
        rec = [seg["many_segments"]["recall_at_10"], seg["one_segment"]["recall_at_10"]]
        bx.set_title(
            f"{seg['n']:,}×{seg['dim']}: recall@10 {rec[0]:.3f} vs {rec[1]:.3f}; compact "
            f"{seg['compact']['compact_s']:.0f}s pays after ~{seg['compaction_pays_after_queries']} "
            "queries",
            fontsize=8,
        )
        bx.legend(fontsize=8)
    fig.suptitle(
        f"{result['machine']['cpu']}, 1 thread, load avg {result['loadavg_before'][0]:.1f}", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--plan",
        default="100000:256,100000:512,1000000:256,1000000:512",
        help="comma-separated N:DIM runs (default: %(default)s)",
    )
    ap.add_argument("--cells", default="Flat,HNSW,IVF-Flat,IVF-PQ+refine")
    ap.add_argument("--segments", type=int, default=20, help="segments for the 1-vs-many run (0: skip)")
    ap.add_argument("--segments-plan", default="100000:256", help="N:DIM of the 1-vs-many run")
    ap.add_argument(
        "--segments-key",
        default=None,
        help="index key of the 1-vs-many run (default: automatic, as adds get)",
    )
    ap.add_argument("--centres", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=10, help="shards written per run (merged on import)")
    ap.add_argument("--search-seconds", type=float, default=6.0, help="time budget per QPS measurement")
    ap.add_argument("--memory-budget-gb", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--toy", action="store_true", help="20k vectors at 32-d, 100 queries, in one process")
    ap.add_argument("--keep", action="store_true", help="keep the collections (in --workdir)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ann.json")
    ap.add_argument("--plot", type=Path, default=IMG / "ann.png")
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from the JSON at --out")
    a = ap.parse_args()
    if a.replot:
        plot(json.loads(a.out.read_text()), a.plot)
        return
    if a.child:
        os.environ["OMP_NUM_THREADS"] = "1"
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(CHILDREN[a.child[0]](json.loads(a.child[1]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.toy:
        global IN_PROCESS
        IN_PROCESS = True
        a.plan, a.segments_plan, a.centres, a.queries, a.search_seconds = "20000:32", "20000:32", 64, 100, 0.2
        a.segments = min(a.segments, 5) if a.segments else 0
    a.cells = set(a.cells.split(","))
    plan = [tuple(int(x) for x in p.split(":")) for p in a.plan.split(",") if p]
    load_before = os.getloadavg()
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "ANN through the collection layer (import of clip-retrieval shards, FAISS per segment)",
        "script": "bench/ann.py",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "args": {
            "segments_key": a.segments_key,
            "segments_plan": a.segments_plan,
            "plan": a.plan,
            "cells": sorted(a.cells),
            "segments": a.segments,
            "centres": a.centres,
            "queries": a.queries,
            "memory_budget_gb": a.memory_budget_gb,
            "toy": a.toy,
        },
        "data": "Gaussian mixture on the sphere (clustered_vectors: unit centres + spread 0.75 noise with a "
        "i^-0.5 spectrum in a random basis); queries from the same mixture; fp16 shards",
        "notes": [
            "one thread everywhere (OMP_NUM_THREADS=1); shared 2-core machine, see loadavg",
            "open times are with a warm page cache (the files were just written)",
            "QPS and recall through Collection.search (Python fan-out and merge included)",
        ],
        "runs": [],
    }
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="af-ann-", dir=a.workdir) as tmp:
        work = Path(tmp) if not a.keep else Path(tempfile.mkdtemp(prefix="af-ann-keep-", dir=a.workdir))
        for i, (n, dim) in enumerate(plan):
            result["runs"].append({"n": n, "dim": dim, "cells": {}})

            def save(res: dict[str, Any], i: int = i) -> None:
                result["runs"][i] = res
                _write(result, a, load_before, started)

            save(run_size(n, dim, work, a, save))
            if i == 0 and a.segments:  # before the long runs: the 1-vs-many result is cheap
                sn, sd = (int(x) for x in a.segments_plan.split(":"))
                result["segments"] = run_segments(sn, sd, work, a)
                _write(result, a, load_before, started)
        if a.segments and "segments" not in result:  # --plan "": the 1-vs-many run alone
            sn, sd = (int(x) for x in a.segments_plan.split(":"))
            result["segments"] = run_segments(sn, sd, work, a)
    _write(result, a, load_before, started)
    plot(result, a.plot)
    for run in result["runs"]:
        print(
            json.dumps({"n": run["n"], "dim": run["dim"], "auto": run["auto_key"], **run.get("target", {})})
        )


def _write(result: dict[str, Any], a: argparse.Namespace, load_before: Any, started: float) -> None:
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
