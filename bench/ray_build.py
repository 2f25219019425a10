"""Ray build vs local build: images/s of ``build --engine ray`` with 1 and 2 encoder actors against the local
build at equal cores, for a compute-bound encoder and for the shipped small model.

* ``compute``: ``open_clip:ViT-B-32`` (random init, 224 px): the encoder pass is the whole cost, so the ratio
  ray / local measures what Ray's scheduling, serialisation and the driver's shard commits cost
  (target >= 0.8 at equal cores).
* ``small``: ``alignfuse:scenes-clip`` (96 px): a few thousand images/s in a plain loop, where Ray's fixed costs
  dominate. Two sizes give each engine's fixed cost and per-image rate (t = a + N / r); from those, the size at
  which k Ray nodes overtake the local build (``a_ray + N / (k r_ray) < a_local + N / r_local``).

The Ray cluster is an in-process local one (2 CPUs here), started once before the timings; its start-up is
timed separately. Equal cores: local = 1 process with 2 torch threads (decode in-process); Ray 1 actor = 2
threads; Ray 2 actors = 1 thread each (0.5 CPU each so the decode tasks still get a CPU, ray#44687).

Usage::

    python bench/ray_build.py                    # ~5 min on 2 CPU cores
    python bench/ray_build.py --compute-images 64 --small-sizes 100,200   # smoke run

Writes ``bench/results/ray_build.json`` and ``bench/results/ray_build.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfuse.index import BuildOptions, ImageFolderSource, build_collection
from alignfuse.index.ray_build import RayOptions, ray_build_collection
from alignfuse.models.base import DualEncoder
from alignfuse.models.registry import create_dual_encoder

log = logging.getLogger("bench.ray_build")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _images(work: Path, n: int) -> Path:
    from alignfuse.data.scenes import generate_scenes

    out = work / f"scenes-{n}"
    if not out.exists():
        generate_scenes(out, seed=11, count=n, split="train", size=96)
    return out / "images"


def _one(
    engine: str, encoder: DualEncoder, images: Path, work: Path, batch: int, actors: int = 0
) -> dict[str, Any]:
    coll = work / f"coll-{engine}-{actors}"
    shutil.rmtree(coll, ignore_errors=True)
    shutil.rmtree(work / f"coll-{engine}-{actors}.shards", ignore_errors=True)
    opts = BuildOptions(batch_size=batch, num_workers=0, commit_every=100_000, progress=False)
    t0 = time.perf_counter()
    if engine == "local":
        torch.set_num_threads(2)
        report = build_collection(coll, ImageFolderSource(images), encoder, options=opts)
    else:
        ropts = RayOptions(actors=actors, cpus_per_actor=0.5, threads_per_actor=2 // actors)
        report = ray_build_collection(
            coll, ImageFolderSource(images), encoder, options=opts, ray_options=ropts
        )
    seconds = time.perf_counter() - t0
    shutil.rmtree(coll, ignore_errors=True)
    row = {
        "engine": engine,
        "actors": actors or None,
        "images": report.added_images,
        "seconds": round(seconds, 3),
        "images_per_s": round(report.added_images / seconds, 2),
    }
    log.info("%s", row)
    return row


def _fit(points: list[dict[str, Any]]) -> dict[str, float]:
    """t = a + N / r through the two sizes."""
    (n1, t1), (n2, t2) = sorted((p["images"], p["seconds"]) for p in points)[:2]
    per = (t2 - t1) / (n2 - n1) if n2 != n1 else t2 / n2
    per = max(per, 1e-9)
    return {"fixed_s": round(t1 - per * n1, 3), "images_per_s": round(1.0 / per, 1)}


def _break_even(local: dict[str, float], ray: dict[str, float], nodes: int) -> float | None:
    """Smallest N with a_ray + N / (k r_ray) < a_local + N / r_local (None: never)."""
    gain = 1.0 / local["images_per_s"] - 1.0 / (nodes * ray["images_per_s"])
    if gain <= 0:
        return None
    return max(0.0, (ray["fixed_s"] - local["fixed_s"]) / gain)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, key, title in (
        (axes[0], "compute", "ViT-B-32 (compute-bound)"),
        (axes[1], "small", "scenes-clip"),
    ):
        rows = result[key]["runs"]
        if key == "small":
            biggest = max(r["images"] for r in rows)
            rows = [r for r in rows if r["images"] == biggest]
        labels = ["local" if r["engine"] == "local" else f"ray, {r['actors']} actor(s)" for r in rows]
        values = [r["images_per_s"] for r in rows]
        bars = ax.bar(
            labels, values, color=["#4c72b0" if r["engine"] == "local" else "#dd8452" for r in rows]
        )
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
        ax.set_title(f"{title}, {rows[0]['images']} images", fontsize=9)
        ax.set_ylabel("images / s")
        ax.set_ylim(0, max(values) * 1.25)
    fig.suptitle(f"build, 2 CPU cores (load avg {result['machine']['loadavg_before'][0]:.1f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compute-model", default="open_clip:ViT-B-32")
    ap.add_argument("--compute-images", type=int, default=160)
    ap.add_argument("--small-model", default="alignfuse:scenes-clip")
    ap.add_argument("--small-sizes", default="500,2000")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "ray_build.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    load_before = os.getloadavg()
    sizes = [int(s) for s in args.small_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="af-rb-", dir="/tmp") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=str(work / "ray"),
            log_to_driver=False,
        )
        ray_start = time.perf_counter() - t0
        try:
            compute = create_dual_encoder(args.compute_model)
            imgs = _images(work, args.compute_images)
            c_runs = [_one("local", compute, imgs, work, args.batch_size)]
            c_runs += [_one("ray", compute, imgs, work, args.batch_size, a) for a in (1, 2)]
            small = create_dual_encoder(args.small_model)
            s_runs = []
            for n in sizes:
                imgs = _images(work, n)
                s_runs.append(_one("local", small, imgs, work, args.batch_size))
                s_runs += [_one("ray", small, imgs, work, args.batch_size, a) for a in (1, 2)]
        finally:
            ray.shutdown()
    local_c = c_runs[0]["images_per_s"]
    fits: dict[str, Any] = {"local": _fit([r for r in s_runs if r["engine"] == "local"])}
    for a in (1, 2):
        fits[f"ray_{a}"] = _fit([r for r in s_runs if r["actors"] == a])
    best = max((f"ray_{a}" for a in (1, 2)), key=lambda k: fits[k]["images_per_s"])
    result: dict[str, Any] = {
        "benchmark": "build --engine ray vs local build, images/s at equal cores",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "script": "bench/ray_build.py",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "note": "shared 2-core machine: other sessions' tests ran during the benchmark (see loadavg)",
        },
        "ray_cluster_start_s": round(ray_start, 2),
        "compute": {
            "model": args.compute_model + " (random init, 224 px)",
            "runs": c_runs,
            "ratio_ray_to_local": {
                f"{r['actors']}_actors": round(r["images_per_s"] / local_c, 3) for r in c_runs[1:]
            },
            "target_ratio": 0.8,
        },
        "small": {
            "model": args.small_model + " (96 px)",
            "runs": s_runs,
            "fit_t_equals_a_plus_n_over_r": fits,
            "ratio_ray_to_local_at_largest": {
                f"{a}_actors": round(
                    next(r for r in s_runs if r["actors"] == a and r["images"] == max(sizes))["images_per_s"]
                    / next(r for r in s_runs if r["engine"] == "local" and r["images"] == max(sizes))[
                        "images_per_s"
                    ],
                    3,
                )
                for a in (1, 2)
            },
            "break_even_images": {
                f"{k}_nodes_like_this": _break_even(fits["local"], fits[best], k) for k in (1, 2, 4, 8, 16)
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    log.info(
        "wrote %s and %s",
        args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out,
        args.out.with_suffix(".png").name,
    )


if __name__ == "__main__":
    main()
