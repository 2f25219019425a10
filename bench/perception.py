"""Perception of the demo pipelines (issue 17): does "a red circle" find red circles, does "a circle" find circles?

On held-out scenes (the demo's gallery: ``--count`` 1,000 test scenes, ``--seed`` 3, as ``alignfuse demo`` makes
them) this builds one collection per pipeline and queries it through the path users hit: the service's
``SearchEngine.search_sync`` (encode the query, ANN over the collection, rerank the top ``--candidates`` with
the cross-encoder's cached image tokens, fused by the reranker's default fusion), ``include_itc=True`` giving the
dual encoder's own order from the same call. Pipelines (``--dual``/``--reranker`` pick one instead):

  * ``albef``: ``alignfuse:scenes-albef`` ITC -> ``alignfuse:scenes-albef`` ITM
  * ``clip``:  ``alignfuse:scenes-clip``      -> ``alignfuse:scenes-albef`` ITM

Queries: "a {colour} {shape}" for every colour-shape pair drawn in the gallery, and "a {shape}" for every shape.
Per query, for the dual encoder's top 5 and the reranked top 5 (``--k``): truth-aware precision@5 (share of the
5 images that show the asked pair / shape, whatever the count), the same under the caption grammar's exact
reading (``caption_matches``: "a red circle" is false of a scene with two), and the share of the 5 that show
the asked colour and the asked shape. Averages over all pairs present (>= 1 image) and over pairs present
>= ``--min-count`` (10) images, the issue's baseline. Targets (issue 17): precision@5 >= 0.9 for both query
kinds, dual and rerank.

``--protocol`` (default on) adds ALBEF's protocol through :func:`alignfuse.evaluation.evaluate` with the same
models (k_test = the candidates, the same fusion): recall, truth-aware recall, group accuracy and the rerank's
R@1 gain, on the held-out split (seed 3) and the compositional split (seed 4), ``--protocol-count`` scenes.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/perception.py            # -> bench/results/perception.json
    .venv/bin/python bench/perception.py --toy --out /tmp/p.json                  # 60 scenes, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ALBEF = "alignfuse:scenes-albef"
CLIP = "alignfuse:scenes-clip"
PIPELINES = {"albef": (ALBEF, ALBEF), "clip": (CLIP, ALBEF)}
TARGET = 0.9

log = logging.getLogger("perception")


@dataclass(frozen=True)
class Query:
    text: str
    kind: str  # "colour_shape" | "shape"
    colour: str | None
    shape: str
    present: int  # gallery images that show the pair (or the shape)


def project_relative(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: project_relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [project_relative(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(f"{ROOT}{os.sep}"):
        return os.path.relpath(obj, ROOT)
    return obj


def environment() -> dict[str, Any]:
    import faiss
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from importlib.metadata import version

    weights = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((ROOT / "models" / "weights").glob("*.safetensors"))
    }
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "weights_sha256": weights,
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "alignfuse": version("alignfuse"),
        },
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def gallery_queries(gallery: dict[str, tuple[dict[str, Any], ...]]) -> list[Query]:
    """One query per colour-shape pair drawn in the gallery and per shape, with how many images show it."""
    from alignfuse.data.scenes import COLOURS, SHAPES, fix_articles, shows

    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            n = sum(shows(objs, colour, shape) for objs in gallery.values())
            if n:
                out.append(Query(fix_articles(f"a {colour} {shape}"), "colour_shape", colour, shape, n))
    for shape in SHAPES:
        n = sum(shows(objs, shape=shape) for objs in gallery.values())
        if n:
            out.append(Query(fix_articles(f"a {shape}"), "shape", None, shape, n))
    return out


def score_order(q: Query, order: list[str], gallery: dict[str, tuple[dict[str, Any], ...]], k: int) -> dict:
    """Truth-aware precision@k (presence and exact reading) and colour / shape shares of ``order[:k]``."""
    from alignfuse.data.scenes import caption_matches, shows
    from alignfuse.evaluation.suggest import first_true, precision_at

    true = frozenset(key for key, objs in gallery.items() if shows(objs, q.colour, q.shape))
    exact = frozenset(key for key, objs in gallery.items() if caption_matches(q.text, objs))
    top = order[:k]
    return {
        "p": precision_at(order, true, k),
        "p_exact": precision_at(order, exact, k),
        "colour": (sum(shows(gallery[x], colour=q.colour) for x in top) / k) if q.colour else None,
        "shape": sum(shows(gallery[x], shape=q.shape) for x in top) / k,
        "first_true": first_true(order, true),
        "top": list(top),
    }


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def aggregate(rows: list[dict], kind: str, min_count: int) -> dict[str, Any]:
    sel = [r for r in rows if r["kind"] == kind and r["present"] >= min_count]
    out: dict[str, Any] = {"queries": len(sel), "min_count": min_count}
    for side in ("dual", "rerank"):
        for key in ("p", "p_exact", "colour", "shape"):
            out[f"{side}_{key}"] = _mean([r[side][key] for r in sel])
        out[f"{side}_meets_target"] = out[f"{side}_p"] is not None and out[f"{side}_p"] >= TARGET
    return out


def run_pipeline(
    name: str,
    dual_spec: str,
    cross_spec: str,
    karpathy: Path,
    scenes_dir: Path,
    data: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from alignfuse.errors import EncoderMismatchError
    from alignfuse.evaluation.suggest import gallery_from_karpathy
    from alignfuse.index import BuildOptions, build_collection, open_source
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder
    from alignfuse.service.engine import SearchEngine
    from alignfuse.service.settings import ModelSettings, Settings
    from alignfuse.service.types import SearchRequest

    dual = create_dual_encoder(dual_spec)
    cross = create_cross_encoder(cross_spec)
    split = "" if args.split == "test" else f"-{args.split}"
    root = data / f"collections-{name}{split}-seed{args.seed}-n{args.count}"
    t0 = time.perf_counter()

    def build() -> Any:
        return build_collection(
            root / "gallery",
            open_source(karpathy=karpathy, image_root=scenes_dir),
            dual,
            options=BuildOptions(rerank_cache=True, batch_size=128, progress=False),
            cross_encoder=cross,
        )

    try:
        built = build()
    except EncoderMismatchError as exc:  # a cache of other weights: measure these, so rebuild it
        log.info("rebuilding %s: %s", root, exc)
        shutil.rmtree(root)
        built = build()
    build_s = time.perf_counter() - t0
    gallery = gallery_from_karpathy(karpathy)
    queries = gallery_queries(gallery)
    settings = Settings(collections=root, models=ModelSettings(dual_encoder=dual_spec, reranker=cross_spec))
    engine = SearchEngine(settings, dual_encoder=dual, cross_encoder=cross)
    engine.load()
    per_cand: dict[str, Any] = {}
    try:
        for cand in args.candidates:
            rows = []
            fusion = None
            t1 = time.perf_counter()
            for q in queries:
                req = SearchRequest(
                    collection="gallery",
                    text=q.text,
                    k=min(cand, settings.limits.max_k),
                    candidates=cand,
                    rerank=True,
                    include_itc=True,
                )
                res = engine.search_sync(req)
                fusion = res.fusion
                dual_order = [Path(h.uri).name for h in (res.itc_hits or [])]
                rerank_order = [Path(h.uri).name for h in res.hits]
                rows.append(
                    {
                        "query": q.text,
                        "kind": q.kind,
                        "present": q.present,
                        "dual": score_order(q, dual_order, gallery, args.k),
                        "rerank": score_order(q, rerank_order, gallery, args.k),
                    }
                )
            secs = time.perf_counter() - t1
            summary = {
                f"{kind}_min{m}": aggregate(rows, kind, m)
                for kind in ("colour_shape", "shape")
                for m in sorted({1, args.min_count})
            }
            per_cand[str(cand)] = {
                "candidates": cand,
                "fusion": fusion,
                "ms_per_query": round(1e3 * secs / max(1, len(queries)), 2),
                "summary": summary,
                "queries": rows,
            }
    finally:
        engine.close()
    out: dict[str, Any] = {
        "dual": dual_spec,
        "reranker": cross_spec,
        "dual_id": dual.info.id,
        "reranker_id": cross.info.id,
        "collection_build_s": round(build_s, 1),
        "collection_items": built.added + built.skipped_existing,
        "by_candidates": per_cand,
    }
    if args.protocol:
        out["protocol"] = protocol(dual, cross, data, args)
    return out


def protocol(dual: Any, cross: Any, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ALBEF's protocol with the same models: held-out (seed 3) and compositional (seed 4) splits."""
    from alignfuse.data.scenes import caption_matches, generate_scenes
    from alignfuse.evaluation import evaluate
    from alignfuse.models.base import default_fusion_for

    fusion = default_fusion_for(cross.info.default_fusion, dual.info.itc_logit_scale)
    out: dict[str, Any] = {"k_test": args.candidates[0], "fusion": fusion, "count": args.protocol_count}
    for split, seed in (("test", 3), ("compositional", 4)):
        sdir = data / f"{split}-seed{seed}-n{args.protocol_count}"
        kp = sdir / "scenes.json"
        if not kp.is_file():
            generate_scenes(sdir, seed=seed, count=args.protocol_count, split=split)
        rep = evaluate(
            None,
            kp,
            sdir,
            dual,
            cross,
            ("dual", "rerank"),
            args.candidates[0],
            256,
            fusion=fusion,
            truth=caption_matches,
        ).to_json()
        d, r = rep["dual"], rep["rerank"]
        out[split] = {
            "dual": d,
            "rerank": r,
            "rerank_gain_tr_r1": round(r["tr_r1"] - d["tr_r1"], 2),
            "rerank_gain_ir_r1": round(r["ir_r1"] - d["ir_r1"], 2),
            "rerank_gain_tr_r1_true": round(r["tr_r1_true"] - d["tr_r1_true"], 2),
            "rerank_gain_ir_r1_true": round(r["ir_r1_true"] - d["ir_r1_true"], 2),
            "group_t2i_gain": round(r["group_acc_t2i"] - d["group_acc_t2i"], 4)
            if "group_acc_t2i" in r
            else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="Gallery size (held-out test scenes).")
    ap.add_argument("--seed", type=int, default=3, help="Scene seed (3: the demo's and the model cards').")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="Gallery split: test (held-out, the demo's) or val (to choose weights on).")  # fmt: skip
    ap.add_argument("--k", type=int, default=5, help="Precision at k.")
    ap.add_argument("--candidates", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128],
                    help="Rerank candidates, comma-separated (first one also k_test of --protocol).")  # fmt: skip
    ap.add_argument("--min-count", type=int, default=10, help="Also average over pairs present >= N times.")
    ap.add_argument("--pipelines", default="albef,clip", help="Comma-separated of: albef, clip.")
    ap.add_argument("--dual", help="Dual-encoder spec (with --reranker: one custom pipeline instead).")
    ap.add_argument("--reranker", help="Cross-encoder spec for --dual.")
    ap.add_argument("--protocol", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--protocol-count", type=int, default=1000, help="Scenes per split for --protocol.")
    ap.add_argument("--data", type=Path, default=ROOT / "demo-data" / "perception")
    ap.add_argument("--out", type=Path, default=RESULTS / "perception.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--toy", action="store_true", help="60 scenes, 40 per protocol split, candidates 8.")
    args = ap.parse_args(argv)
    if args.toy:
        args.count, args.protocol_count, args.candidates = 60, 40, [8]
    if (args.dual is None) != (args.reranker is None):
        ap.error("--dual and --reranker go together")
    if args.k < 1 or min(args.candidates) < args.k or args.count < 1:
        ap.error("need k >= 1, candidates >= k, count >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from alignfuse.data.scenes import generate_scenes

    torch.set_num_threads(args.threads)
    pipes = (
        {"custom": (args.dual, args.reranker)}
        if args.dual
        else {p: PIPELINES[p] for p in args.pipelines.split(",") if p}
    )
    env = environment()
    scenes_dir = args.data / f"scenes-{args.split}-seed{args.seed}-n{args.count}"
    karpathy = scenes_dir / "scenes.json"
    if not karpathy.is_file():
        generate_scenes(scenes_dir, seed=args.seed, count=args.count, split=args.split)
    result: dict[str, Any] = {
        "bench": "perception",
        "gallery": {"split": args.split, "seed": args.seed, "count": args.count},
        "k": args.k,
        "target_precision": TARGET,
        "min_count": args.min_count,
        "judge": "p: the image shows the asked colour-shape pair (or shape), whatever the count; p_exact: "
        "caption_matches (exact counts: 'a red circle' is false of two red circles); colour/shape: share of "
        "the top k showing the asked colour / shape",
        "path": "service SearchEngine.search_sync over a built collection (rerank cache), include_itc=True",
        **env,
        "pipelines": {},
    }
    for name, (dspec, cspec) in pipes.items():
        log.info("pipeline %s: %s -> %s", name, dspec, cspec)
        result["pipelines"][name] = run_pipeline(name, dspec, cspec, karpathy, scenes_dir, args.data, args)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = project_relative(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return result


# The perception figures the model cards quote, on a small gallery (recomputed by tests/test_shipped_models.py).
CARD_GALLERY: dict[str, Any] = {"split": "test", "seed": 3, "count": 300, "candidates": 16}


def card_perception(data: Path) -> dict[str, Any]:
    """P@5 dual / rerank of both demo pipelines on the first ``CARD_GALLERY['count']`` held-out scenes, for
    "a {colour} {shape}" (every pair present) and "a {shape}": the path and scoring of :func:`main`."""
    sub = CARD_GALLERY
    res = main(
        [
            "--count", str(sub["count"]), "--seed", str(sub["seed"]), "--split", sub["split"],
            "--candidates", str(sub["candidates"]), "--no-protocol", "--data", str(data),
            "--out", str(data / "card_perception.json"),
        ]
    )  # fmt: skip
    out: dict[str, Any] = {"gallery": sub}
    for name, pipe in res["pipelines"].items():
        summary = pipe["by_candidates"][str(sub["candidates"])]["summary"]
        out[name] = {
            "dual_id": pipe["dual_id"],
            **{
                f"{kind}_p5_{side}": summary[f"{kind}_min1"][f"{side}_p"]
                for kind in ("colour_shape", "shape")
                for side in ("dual", "rerank")
            },
        }
    return out


def report(result: dict[str, Any]) -> str:
    """A markdown table of the summaries (mean precision@k dual / rerank, colour and shape shares)."""
    lines = [
        "| pipeline | C | queries | n | P@5 dual | P@5 rerank | exact dual / rerank | colour in top 5 | "
        "shape in top 5 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for name, pipe in result["pipelines"].items():
        for cand, block in pipe["by_candidates"].items():
            for key, s in block["summary"].items():
                lines.append(
                    f"| {name} | {cand} | {key} | {s['queries']} | {f(s['dual_p'])} | {f(s['rerank_p'])} | "
                    f"{f(s['dual_p_exact'])} / {f(s['rerank_p_exact'])} | {f(s['dual_colour'])} / "
                    f"{f(s['rerank_colour'])} | {f(s['dual_shape'])} / {f(s['rerank_shape'])} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
