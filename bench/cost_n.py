"""Cost in N: per-query time and pair evaluations of dual, dual + rerank and all pairs as the gallery grows.

Galleries of N generated scenes (``alignfuse.data.scenes.generate_scenes``, test split, fixed seed; the
galleries are prefixes of one generated set, so each contains the smaller ones) with the shipped ALBEF
(``--model``, resolved at run time: ITC as the dual encoder, ITM as the reranker, its default score fusion).
The gallery is encoded once, as a collection build with the rerank cache does (ITC embeddings + fp16 image
tokens); that build cost is reported but is not per query. Then, for text→image queries one at a time (as a
service serves them; one caption per sampled image, the image is the ground truth):

* ``dual``: encode the text, exact cosine against the N image embeddings, top-C;
* ``rerank_C`` for C in ``--candidates``: dual, then the cross-encoder over 1 text × C candidate images
  (their tokens as from the feature cache), candidates re-sorted by the fused score;
* ``all_pairs``: the cross-encoder over 1 text × N images (every query at small N; a sample of queries at
  large N, ``--all-pairs-budget`` pairs per N; beyond ``--all-pairs-max-n`` not run and extrapolated from the
  measured pairs/s, labelled ``extrapolated``).

R@1 (text→image, ALBEF's strict protocol and tie rule: ``alignfuse.evaluation.metrics.ranks_t2i``) is computed
over the same queries for every mode, so rerank vs all pairs compare like for like. Non-candidates score −100,
as in ``alignfuse.evaluation.protocol``'s rerank mode.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cost_n.py              # N = 300, 1k, 3k, 10k
    OMP_NUM_THREADS=1 .venv/bin/python bench/cost_n.py --quick      # toy sizes (the test)

Writes ``bench/results/cost_n.json`` and ``docs/img/cost_n.png`` (log–log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import ROOT, machine_info, resolve

from alignfuse.models.base import CrossEncoder, DualEncoder, default_fusion_for, fuse_scores

log = logging.getLogger("bench.cost_n")
NON_CANDIDATE = -100.0


def gallery(data: Path, n_max: int, seed: int) -> tuple[list[Path], list[str]]:
    """Generate (once) ``n_max`` test-split scenes; their image paths and first captions."""
    from alignfuse.data.scenes import generate_scenes

    root = data / f"test-seed{seed}-n{n_max}"
    karpathy = root / "scenes.json"
    if not karpathy.is_file():
        generate_scenes(root, seed=seed, count=n_max, split="test")
    entries = json.loads(karpathy.read_text())
    paths = [root / e["image"] for e in entries]
    captions = [e["caption"][0] if isinstance(e["caption"], list) else e["caption"] for e in entries]
    return paths, captions


def encode_gallery(
    dual: DualEncoder, cross: CrossEncoder, paths: list[Path], batch: int
) -> tuple[np.ndarray, torch.Tensor, float]:
    """ITC embeddings [N, E] and fp16 image tokens [N, L, D] (one ViT pass when the models share it)."""
    from alignfuse.evaluation.data import pixel_batches

    t0 = time.perf_counter()
    embs, toks = [], []
    both = getattr(dual, "encode_images_with_tokens", None)
    with torch.inference_mode():
        for pixels in pixel_batches(paths, dual.image_transform, batch):
            if both is not None:
                e, t = both(pixels)
            else:
                e, t = dual.encode_images(pixels), cross.image_states(pixels).tokens.to("cpu", torch.float16)
            embs.append(e)
            toks.append(t)
    return np.concatenate(embs), torch.cat(toks), time.perf_counter() - t0


class Scorer:
    """The per-query stages, timed. ``score(text, idx)`` → fused scores of the text against images ``idx``."""

    def __init__(self, dual: DualEncoder, cross: CrossEncoder, emb: np.ndarray, tokens: torch.Tensor) -> None:
        self.dual, self.cross, self.emb, self.tokens = dual, cross, emb, tokens
        self.scale = dual.info.itc_logit_scale
        self.fusion = default_fusion_for(cross.info.default_fusion, self.scale)
        self.max_pairs = int(getattr(cross, "max_pairs", 256))

    def dual_stage(self, text: str, n: int) -> np.ndarray:
        q = self.dual.encode_texts([text])[0]
        return self.emb[:n] @ q  # cosine (both normalised)

    def cross_stage(self, text: str, idx: np.ndarray, cos: np.ndarray) -> np.ndarray:
        ts = self.cross.text_states([text])
        logits = []
        for a in range(0, len(idx), self.max_pairs):
            sel = torch.from_numpy(idx[a : a + self.max_pairs])
            states = self.cross.image_states_from_tokens(self.tokens[sel])
            logits.append(self.cross.score(ts, states).logit)
        return fuse_scores(np.concatenate(logits), cos[idx], self.fusion, self.scale)


def run_n(
    sc: Scorer, captions: list[str], n: int, queries: np.ndarray, cands: list[int], ap_queries: int
) -> dict[str, Any]:
    from alignfuse.evaluation.metrics import ranks_t2i, topk_indices

    q = len(queries)
    modes = ["dual", *[f"rerank_{c}" for c in cands]]
    scores = {m: np.full((q, n), NON_CANDIDATE, dtype=np.float32) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    ap_scores = np.full((ap_queries, n), NON_CANDIDATE, dtype=np.float32)
    ap_times: list[float] = []
    with torch.inference_mode():
        for row, img in enumerate(queries):
            text = captions[int(img)]
            t0 = time.perf_counter()
            cos = sc.dual_stage(text, n)
            top = topk_indices(cos[None, :], max(cands))[0]
            t_dual = time.perf_counter() - t0
            scores["dual"][row] = cos
            times["dual"].append(t_dual)
            for c in cands:
                t1 = time.perf_counter()
                idx = top[:c]
                fused = sc.cross_stage(text, idx, cos)
                order = idx[np.argsort(-fused, kind="stable")]  # the ranked list a service returns
                times[f"rerank_{c}"].append(t_dual + time.perf_counter() - t1)
                scores[f"rerank_{c}"][row, idx] = fused
                assert len(order) == len(idx)
            if row < ap_queries:
                t2 = time.perf_counter()
                allf = sc.cross_stage(text, np.arange(n), cos)
                np.argsort(-allf, kind="stable")
                ap_times.append(time.perf_counter() - t2)
                ap_scores[row] = allf
    out: dict[str, Any] = {"n": n, "queries": q, "modes": {}}
    for m in modes:
        ranks = ranks_t2i(scores[m], queries)
        pairs = 0 if m == "dual" else int(m.split("_")[1])
        out["modes"][m] = {
            "per_query_s_median": float(np.median(times[m])),
            "per_query_s_mean": float(np.mean(times[m])),
            "pair_evals_per_query": min(pairs, n),
            "r1_t2i": 100.0 * float(np.mean(ranks < 1)),
            "r1_queries": q,
        }
    ap: dict[str, Any] = {"pair_evals_per_query": n, "queries_timed": ap_queries, "extrapolated": False}
    if ap_queries:
        ap["per_query_s_median"] = float(np.median(ap_times))
        ap["per_query_s_mean"] = float(np.mean(ap_times))
        ap["pairs_per_s"] = n / float(np.median(ap_times))
        ranks = ranks_t2i(ap_scores, queries[:ap_queries])
        ap["r1_t2i"] = 100.0 * float(np.mean(ranks < 1))
        ap["r1_queries"] = ap_queries
        # the other modes on the same (sub)set of queries, for a like-for-like comparison
        for m in modes:
            r = ranks_t2i(scores[m][:ap_queries], queries[:ap_queries])
            out["modes"][m]["r1_t2i_on_all_pairs_queries"] = 100.0 * float(np.mean(r < 1))
    out["modes"]["all_pairs"] = ap
    return out


def targets(rows: list[dict[str, Any]], cands: list[int]) -> dict[str, Any]:
    """The issue's targets, met or missed by how much (on the largest C that was run)."""
    by_n = {r["n"]: r for r in rows}
    c = max(cands)
    out: dict[str, Any] = {"candidates": c}
    if 1000 in by_n and 10000 in by_n:
        ratio = by_n[10000]["modes"][f"rerank_{c}"]["per_query_s_median"] / max(
            1e-12, by_n[1000]["modes"][f"rerank_{c}"]["per_query_s_median"]
        )
        out["two_stage_time_10k_over_1k"] = {"value": ratio, "target": "<= 2", "met": ratio <= 2.0}
    if 10000 in by_n:
        fewer = 10000 / c
        out["pair_passes_fewer_at_10k"] = {"value": fewer, "target": ">= 50", "met": fewer >= 50}
    gaps = {}
    for r in rows:
        ap = r["modes"]["all_pairs"]
        if "r1_t2i" in ap and not ap.get("extrapolated"):
            gap = ap["r1_t2i"] - r["modes"][f"rerank_{c}"]["r1_t2i_on_all_pairs_queries"]
            gaps[str(r["n"])] = {
                "all_pairs_minus_rerank_points": gap,
                "met": gap <= 1.0,
                "queries": ap["r1_queries"],
            }
    out["r1_within_1_point"] = gaps
    return out


def plot(rows: list[dict[str, Any]], cands: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, label in [("dual", "dual only"), *[(f"rerank_{c}", f"dual + rerank C={c}") for c in cands]]:
        ax1.plot(ns, [r["modes"][m]["per_query_s_median"] for r in rows], marker="o", label=label)
        if m != "dual":  # dual runs no cross-encoder pair (N dot products)
            ax2.plot(ns, [r["modes"][m]["pair_evals_per_query"] for r in rows], marker="o", label=label)
    ap = [r["modes"]["all_pairs"] for r in rows]
    meas = [(n, a["per_query_s_median"]) for n, a in zip(ns, ap, strict=True) if not a["extrapolated"]]
    extra = [(n, a["per_query_s_median"]) for n, a in zip(ns, ap, strict=True) if a["extrapolated"]]
    if meas:
        ax1.plot(*zip(*meas, strict=True), marker="s", color="k", label="all pairs (measured)")
    if extra:
        last = meas[-1:] if meas else []
        ax1.plot(
            *zip(*(last + extra), strict=True),
            marker="x",
            ls="--",
            color="k",
            label="all pairs (extrapolated)",
        )
    ax2.plot(ns, ns, marker="s", color="k", label="all pairs")
    for ax, ylabel in ((ax1, "per-query wall time (s, median)"), (ax2, "pair evaluations per query")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery size N (images)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="alignfuse:scenes-albef", help="ALBEF spec (ITC dual + ITM reranker)")
    ap.add_argument("--sizes", default="300,1000,3000,10000")
    ap.add_argument("--candidates", default="16,64,128")
    ap.add_argument("--queries", type=int, default=200, help="text→image queries per N (at most N)")
    ap.add_argument("--all-pairs-budget", type=int, default=100_000, help="all-pairs pair evaluations per N")
    ap.add_argument("--all-pairs-max-n", type=int, default=10_000, help="larger N: all pairs extrapolated")
    ap.add_argument("--seed", type=int, default=3, help="scene generator seed (the test split's model card)")
    ap.add_argument("--data", default="runs/bench-cost-n", help="where the generated scenes go")
    ap.add_argument("--batch", type=int, default=256, help="images per encoder batch for the gallery")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="toy sizes: N = 20, 40; C = 4, 8; 6 queries")
    ap.add_argument("--out", default="bench/results/cost_n.json")
    ap.add_argument("--plot", default=None, help="default: docs/img/<the --out file's stem>.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.sizes, args.candidates, args.queries, args.all_pairs_budget = "20,40", "4,8", 6, 400
    torch.set_num_threads(args.threads)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    cands = sorted(int(c) for c in args.candidates.split(","))
    info = machine_info()
    t_start = time.perf_counter()
    dual, cross = create_dual_encoder(args.model), create_cross_encoder(args.model)
    t0 = time.perf_counter()
    paths, captions = gallery(resolve(args.data), sizes[-1], args.seed)
    gen_s = time.perf_counter() - t0
    emb, tokens, enc_s = encode_gallery(dual, cross, paths, args.batch)
    log.info("gallery: %d scenes generated in %.0f s, encoded in %.0f s", len(paths), gen_s, enc_s)
    sc = Scorer(dual, cross, emb, tokens)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        queries = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
        ap_q = 0 if n > args.all_pairs_max_n else min(len(queries), max(1, args.all_pairs_budget // n))
        r = run_n(sc, captions, n, queries, cands, ap_q)
        if not ap_q:  # extrapolate from the largest measured N's pairs/s
            done = [x["modes"]["all_pairs"] for x in rows if not x["modes"]["all_pairs"]["extrapolated"]]
            if done:
                pps = done[-1]["pairs_per_s"]
                r["modes"]["all_pairs"].update(
                    {"extrapolated": True, "per_query_s_median": n / pps, "per_query_s_mean": n / pps}
                )
        rows.append(r)
        m = r["modes"]
        log.info(
            "N=%d: dual %.4f s, rerank C=%d %.4f s (R@1 %.1f), all pairs %.3f s%s (R@1 %s) over %d queries",
            n, m["dual"]["per_query_s_median"], cands[-1], m[f"rerank_{cands[-1]}"]["per_query_s_median"],
            m[f"rerank_{cands[-1]}"]["r1_t2i"], m["all_pairs"].get("per_query_s_median", float("nan")),
            " (extrapolated)" if m["all_pairs"]["extrapolated"] else "", m["all_pairs"].get("r1_t2i", "-"),
            r["queries"],
        )  # fmt: skip
        info["loadavg_end"] = list(os.getloadavg())
        result = {
            "benchmark": "cost in N: text→image per-query time, pair evaluations and R@1 of dual, dual + rerank, "
            "all pairs",
            "model": args.model,
            "model_id": cross.info.id,
            "fusion": sc.fusion,
            "seed": args.seed,
            "split": "test",
            "data": os.path.relpath(resolve(args.data), ROOT),
            "gallery": {
                "generate_s": gen_s,
                "encode_s": enc_s,
                "images": len(paths),
                "note": "once, not per query",
            },
            "timing": "one query at a time, 1 torch thread; per-query median; rerank time includes the dual stage",
            "machine": info,
            "total_s": time.perf_counter() - t_start,
            "complete": len(rows) == len(sizes),  # written after every N: a cut-short run keeps its rows
            "results": rows,
            "targets": targets(rows, cands),
        }
        out = resolve(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        png = resolve(args.plot or f"docs/img/{out.stem}.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()[0]
        plot(
            rows,
            cands,
            png,
            f"{args.model} ({sc.fusion}), {info['cpu']}, 1 thread, load {load:.1f} at the end",
        )
    log.info("wrote %s and %s (%.0f s)", out, png, result["total_s"])


if __name__ == "__main__":
    main()
