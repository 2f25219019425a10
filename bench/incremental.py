"""Incremental cost: adding M items to a collection of N, against rebuilding it from scratch.

The claim (docs/architecture.md): an add writes one new segment, so adding M items costs M encoder passes and
O(M) index work and I/O, whatever N is. Measured in one run, two ways:

* ``vectors``: the index cost alone. Base collections of N = 1k, 10k, 100k clustered 256-d vectors (the
  automatic index: Flat up to 50k, HNSW above) imported from clip-retrieval shards; then M = 100 and 1,000 new
  vectors imported into them (``alignfuse import`` into an existing collection: one new segment), each
  repeated; against a rebuild = importing all N + M into a new collection.
* ``encoder``: with the shipped ``alignfuse:scenes-albef`` dual encoder in the loop, on freshly generated
  scenes (``alignfuse add``: decode, encode, write, index, commit); the base collections hold N vectors of the
  encoder's dimension, so the encoder only runs on the M new scenes. The rebuild re-encodes N + M scenes:
  measured at N = 1k, extrapolated linearly in items (labelled) for larger N.

Usage::

    python bench/incremental.py            # ~10-20 min on 2 busy cores
    python bench/incremental.py --toy      # seconds (the end-to-end test)

Writes ``bench/results/incremental.json`` and ``docs/img/incremental.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ann_cells import _time_index_builds  # noqa: E402
from ann_data import encoder_info, git_commit, machine, write_shards  # noqa: E402

log = logging.getLogger("bench.incremental")
RESULTS = HERE / "results"
IMG = HERE.parent / "docs" / "img"


BUDGET: dict[str, int] = {}  # --memory-budget-gb, for the automatic index choice


def _index_options() -> Any:
    from alignfuse.index import IndexOptions

    budget = BUDGET.get("memory_budget_bytes")
    return IndexOptions() if budget is None else IndexOptions(memory_budget_bytes=budget)


def _import(coll: Path, shards: Path, info: Any) -> float:
    from alignfuse.index.shards import ImportOptions, import_shards

    opts = ImportOptions(index=_index_options())
    t0 = time.perf_counter()
    import_shards(coll, shards, encoder=info, options=opts)
    return time.perf_counter() - t0


def _new_vectors(root: Path, m: int, dim: int, seed: int, centres: int) -> Path:
    """A clip-retrieval shard folder of ``m`` new vectors whose uris do not collide with the base's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_shards(root, m, dim, m, seed=seed, centres=centres)
    meta = next((root / "metadata").glob("metadata_*.parquet"))
    pq.write_table(pa.table({"image_path": [f"add-{seed}/{i:06d}.jpg" for i in range(m)]}), meta)
    return root


def vectors_part(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    info = encoder_info(a.dim)
    rows: list[dict[str, Any]] = []
    seed = 100
    for n in a.sizes:
        base = work / f"v-base-{n}"
        write_shards(work / f"v-shards-{n}", n, a.dim, max(1, n // 10), seed=1, centres=a.centres)
        base_s = _import(base, work / f"v-shards-{n}", info)
        seed += 1
        warm = _new_vectors(work / f"v-warm-{seed}", 10, a.dim, seed, a.centres)
        _import(base, warm, info)  # warm-up (first-call costs: imports, sqlite caches)
        shutil.rmtree(warm)
        for m in a.adds:
            times, builds = [], []
            for _ in range(a.repeats):
                seed += 1
                src = _new_vectors(work / f"v-add-{seed}", m, a.dim, seed, a.centres)
                spent = _time_index_builds()
                spent["s"] = 0.0
                times.append(_import(base, src, info))
                builds.append(spent["s"])
                shutil.rmtree(src)
            if m != max(a.adds):
                rows.append(
                    {
                        "n": n,
                        "m": m,
                        "add_s": round(statistics.median(times), 3),
                        "add_s_all": [round(t, 3) for t in times],
                        "add_index_build_s": round(statistics.median(builds), 3),
                        "base_import_s": round(base_s, 2),
                    }
                )
                log.info("vectors %s", rows[-1])
                continue
            # rebuild from scratch, once per N (with the largest M): all N + M vectors into a new collection
            seed += 1
            both = work / f"v-both-{n}-{m}"
            write_shards(both, n, a.dim, max(1, n // 10), seed=1, centres=a.centres)
            extra = _new_vectors(work / f"v-extra-{seed}", m, a.dim, seed, a.centres)
            k = len(list((both / "metadata").iterdir()))
            for sub, stem in (("img_emb", "img_emb"), ("metadata", "metadata")):
                src_f = next((extra / sub).iterdir())
                shutil.move(src_f, both / sub / f"{stem}_{k}{src_f.suffix}")
            rebuild_s = _import(work / f"v-rebuild-{n}-{m}", both, info)
            shutil.rmtree(both)
            shutil.rmtree(extra)
            shutil.rmtree(work / f"v-rebuild-{n}-{m}")
            add_s = statistics.median(times)
            for r in rows:  # the smaller adds at this N: rebuilding N + M_small costs about the same
                if r["n"] == n and "rebuild_s" not in r:
                    r["rebuild_s"] = round(rebuild_s, 2)
                    r["rebuild_over_add"] = round(rebuild_s / r["add_s"], 1)
                    r["rebuild"] = f"measured with M={m} (N+{m} vectors)"
            rows.append(
                {
                    "n": n,
                    "m": m,
                    "add_s": round(add_s, 3),
                    "add_s_all": [round(t, 3) for t in times],
                    "add_index_build_s": round(statistics.median(builds), 3),
                    "rebuild_s": round(rebuild_s, 2),
                    "rebuild_over_add": round(rebuild_s / add_s, 1),
                    "rebuild": "measured",
                    "base_import_s": round(base_s, 2),
                }
            )
            log.info("vectors %s", rows[-1])
        shutil.rmtree(base)
        shutil.rmtree(work / f"v-shards-{n}")
    return {"dim": a.dim, "rows": rows, **_fits(rows, a)}


def encoder_part(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from alignfuse.data.scenes.generate import generate_scenes
    from alignfuse.index import BuildOptions, KarpathySource, build_collection
    from alignfuse.models.registry import create_dual_encoder

    torch.set_num_threads(1)
    enc = create_dual_encoder(a.model)
    dim = enc.embed_dim
    if BUDGET:  # the same budget per vector as the vectors part: the same automatic index family
        BUDGET["memory_budget_bytes"] = int(BUDGET["memory_budget_bytes"] * dim / a.dim)
    opts = BuildOptions(progress=False, num_workers=0, batch_size=64, index=_index_options())
    rows: list[dict[str, Any]] = []
    seed = 1000
    gen_s = 0.0

    def scenes(m: int) -> Path:
        nonlocal seed, gen_s
        seed += 1
        t0 = time.perf_counter()
        path = generate_scenes(work / f"scenes-{seed}", seed=seed, count=m, split="train", size=a.scene_size)
        gen_s += time.perf_counter() - t0
        return path

    probe = json.loads(scenes(4).read_text())
    per_scene = sum(1 + (len(e["caption"]) if isinstance(e["caption"], list) else 1) for e in probe) / 4
    rebuild_rate: float | None = None
    for n in a.sizes:
        base = work / f"e-base-{n}"
        write_shards(work / f"e-shards-{n}", n, dim, max(1, n // 10), seed=1, centres=a.centres)
        _import(base, work / f"e-shards-{n}", enc.info)
        warm = scenes(2)  # warm-up add (first-call costs)
        build_collection(base, KarpathySource(warm, split="train"), enc, options=opts, must_exist=True)
        for m in a.adds:
            js = scenes(max(1, round(m / per_scene)))  # about M items: an image and its captions each
            spent = _time_index_builds()
            spent["s"] = 0.0
            t0 = time.perf_counter()
            r = build_collection(base, KarpathySource(js, split="train"), enc, options=opts, must_exist=True)
            add_s = time.perf_counter() - t0
            row: dict[str, Any] = {
                "n": n,
                "m": m,
                "items_added": r.added,
                "add_s": round(add_s, 3),
                "add_index_build_s": round(spent["s"], 3),
            }
            if n == min(a.sizes):  # rebuild with the encoder: about N + M items encoded from scratch
                base_js = scenes(max(1, round(n / per_scene)))
                t0 = time.perf_counter()
                rb = build_collection(
                    work / f"e-rebuild-{n}-{m}",
                    [KarpathySource(base_js, split="train"), KarpathySource(js, split="train")],
                    enc,
                    options=opts,
                )
                row["rebuild_s"] = round(time.perf_counter() - t0, 2)
                rebuild_rate = rb.added / row["rebuild_s"]
                row["rebuild"] = "measured"
                shutil.rmtree(work / f"e-rebuild-{n}-{m}")
            elif rebuild_rate:
                row["rebuild_s"] = round((n + r.added) / rebuild_rate, 2)
                row["rebuild"] = f"extrapolated from {min(a.sizes):,} at {rebuild_rate:.0f} items/s"
            if "rebuild_s" in row:
                row["rebuild_over_add"] = round(row["rebuild_s"] / add_s, 1)
            rows.append(row)
            log.info("encoder %s", row)
        shutil.rmtree(base)
        shutil.rmtree(work / f"e-shards-{n}")
    return {
        "model": a.model,
        "dim": dim,
        "scene_size": a.scene_size,
        "items_per_scene": per_scene,
        "scene_generation_s": round(gen_s, 1),
        "rows": rows,
        **_fits(rows, a),
    }


def _fits(rows: list[dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    """Flat in N: add time at the largest N over the smallest, per M. Proportional to M: add time at the
    largest M over the smallest, per N (the M ratio is the ideal)."""
    by = {(r["n"], r["m"]): r["add_s"] for r in rows}
    lo_n, hi_n, lo_m, hi_m = min(a.sizes), max(a.sizes), min(a.adds), max(a.adds)
    return {
        "add_s_ratio_largest_over_smallest_n": {
            str(m): round(by[(hi_n, m)] / by[(lo_n, m)], 2) for m in a.adds if (lo_n, m) in by
        },
        "add_s_ratio_largest_over_smallest_m": {
            str(n): round(by[(n, hi_m)] / by[(n, lo_m)], 2) for n in a.sizes if (n, lo_m) in by
        },
        "ideal_m_ratio": hi_m / lo_m,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("vectors", "encoder") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        rows = result[part]["rows"]
        for m in sorted({r["m"] for r in rows}):
            rs = [r for r in rows if r["m"] == m]
            ax.plot([r["n"] for r in rs], [r["add_s"] for r in rs], "o-", label=f"add M={m:,}")
            rb = [r for r in rs if "rebuild_s" in r]
            ax.plot([r["n"] for r in rb], [r["rebuild_s"] for r in rb], "s--", label=f"rebuild N+{m:,}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("collection size N")
        ax.set_ylabel("seconds")
        title = {
            "vectors": f"vectors only (import, {result['vectors']['dim'] if part == 'vectors' else ''}-d)",
            "encoder": f"encoder in the loop ({result.get('encoder', {}).get('model', '')})",
        }[part]
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"add M vs rebuild; 1 thread, load avg {result['loadavg_before'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(result: dict[str, Any], a: argparse.Namespace, started: float) -> None:
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--adds", default="100,1000")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each vectors-only add (median)")
    ap.add_argument("--dim", type=int, default=256, help="dimension of the vectors-only part")
    ap.add_argument("--centres", type=int, default=2048)
    ap.add_argument("--model", default="alignfuse:scenes-albef")
    ap.add_argument("--scene-size", type=int, default=96)
    ap.add_argument("--parts", default="vectors,encoder")
    ap.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="memory budget of the automatic index choice (default 4 GB: HNSW32 above 50k; 0.11: IVF-Flat)",
    )
    ap.add_argument("--toy", action="store_true", help="N in {100, 400}, M in {12, 48}, 32-d: seconds")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "incremental.json")
    ap.add_argument("--plot", type=Path, default=IMG / "incremental.png")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("alignfuse", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.toy:
        a.sizes, a.adds, a.repeats, a.dim, a.centres, a.scene_size = "100,400", "12,48", 1, 32, 16, 64
    if a.memory_budget_gb is not None:
        BUDGET["memory_budget_bytes"] = int(a.memory_budget_gb * (1 << 30))
    a.sizes = [int(x) for x in str(a.sizes).split(",")]
    a.adds = [int(x) for x in str(a.adds).split(",")]
    parts = a.parts.split(",")
    load_before = os.getloadavg()
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "incremental adds (one new segment) vs rebuild from scratch",
        "script": "bench/incremental.py",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "args": {
            "sizes": a.sizes,
            "adds": a.adds,
            "repeats": a.repeats,
            "memory_budget_gb": a.memory_budget_gb,
            "toy": a.toy,
        },
        "notes": [
            "one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)); shared 2-core machine, see loadavg",
            "add_s: wall time of one `import`/`add` into the existing collection (one new committed segment)",
            "the automatic index key is chosen from the collection's total size: HNSW32 segments above 50k",
        ],
    }
    with tempfile.TemporaryDirectory(prefix="af-inc-", dir=a.workdir) as tmp:
        work = Path(tmp)
        for part, fn in (("vectors", vectors_part), ("encoder", encoder_part)):
            if part in parts:
                result[part] = fn(a, work)
                _write(result, a, started)
    _write(result, a, started)
    plot(result, a.plot)
    for p in parts:
        print(json.dumps({p: {k: v for k, v in result[p].items() if k != "rows"}}))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
