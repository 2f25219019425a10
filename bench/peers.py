"""alignfuse against its peers, side by side in one run: clip-retrieval (build, search) and infinity (embeddings).

Every system uses the same open_clip ViT-B-32 (random init, seed 0, saved once to a local file; a transformers
``CLIPModel`` of the same architecture for infinity), the same images (synthetic scenes, 224 px PNG, in an
image-only folder), the same torch thread count (``--threads``, through ``OMP_NUM_THREADS`` and
``torch.set_num_threads``) and runs alone: servers one at a time, each cell repeated with the systems'
order alternating (A B B A ...) so that the shared machine's background load hits both alike; the load average
is recorded before and after every cell.

(a) build: ``clip-retrieval inference`` vs ``alignfuse build`` (both CLIs, fresh processes, end-to-end wall
    time: start, model load, decode, encode, write; alignfuse also indexes and commits).
(b) search: ``clip-retrieval back`` (bound to 127.0.0.1, over the index ``clip-retrieval index`` built from its
    own inference output) vs ``alignfuse serve --reranker none`` over the collection built in (a): closed-loop
    load (asyncio + httpx) at each concurrency, text queries, same k.
(c) embeddings: ``infinity_emb v2 --engine torch --device cpu`` (``/embeddings``, batches of ``--embed-batch``)
    vs alignfuse's dual encoder from the same bytes (decode + transform + forward, in-process: alignfuse serves
    no embedding endpoint; see bench/_peers/af_embed.py).

The peers are installed in their own venvs by ``scripts/peers-venv.sh`` (default ``/work/peers``, or
``$ALIGNFUSE_PEERS_DIR``); a peer whose venv is missing is recorded as skipped with the reason.

Usage::

    scripts/peers-venv.sh && python bench/peers.py          # ~15 min on 2 loaded cores
    python bench/peers.py --toy                             # a tiny end-to-end run (the test)

Writes ``bench/results/peers.json`` and ``docs/img/peers.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._peers import systems  # noqa: E402
from bench._peers.common import closed_loop, cpu_model, git_commit, loadavg, peer, peers_dir, rel  # noqa: E402
from bench._peers.plot import plot  # noqa: E402
from bench._peers.prepare import make_images, save_hf_clip, save_open_clip  # noqa: E402
from bench._peers.summary import summarise  # noqa: E402

log = logging.getLogger("bench.peers")


def _order(rep: int, systems_: list[str]) -> list[str]:
    return systems_ if rep % 2 == 0 else systems_[::-1]


def alignfuse_runtime(runtime: str) -> tuple[str, dict[str, str], list[str]]:
    """Pin the alignfuse model runtime where this checkout has one: (runtime recorded, env for ``serve``,
    extra ``build`` options). Without a runtime setting, torch is the only runtime."""
    import inspect

    from alignfuse.service.cli.build import build_command
    from alignfuse.service.settings import ModelSettings

    serve_env = {"ALIGNFUSE_MODELS__RUNTIME": runtime} if "runtime" in ModelSettings.model_fields else {}
    build_args = ["--runtime", runtime] if "runtime" in inspect.signature(build_command).parameters else []
    return (runtime if serve_env or build_args else "torch"), serve_env, build_args


# ------------------------------------------------------------------------------------------------- cells
def run_build(
    args: argparse.Namespace, work: Path, images: Path, model_file: Path, cr_ok: bool
) -> dict[str, Any]:
    cr = peer("clip-retrieval")
    cells: list[dict[str, Any]] = []
    names = ["alignfuse", "clip-retrieval"] if cr_ok else ["alignfuse"]
    for rep in range(args.build_repeats or args.repeats):
        for name in _order(rep, names):
            if name == "alignfuse":
                res = systems.alignfuse_build(
                    images, model_file, work / "collections" / "bench", args.batch, args.workers, args.threads,
                    args.timeout, args.af_build_args,
                )  # fmt: skip
            else:
                res = systems.clip_inference(
                    cr,
                    images,
                    model_file,
                    work / "cr_emb",
                    args.batch,
                    args.workers,
                    args.threads,
                    args.timeout,
                )
            ok = "error" not in res
            res.update(
                system=name, repeat=rep, images_per_s=(res.get("images") or 0) / res["wall_s"] if ok else None
            )
            cells.append(res)
            log.info("build %-14s rep %d: %s images/s (%.1f s, load %s -> %s)%s", name, rep,
                     f"{res['images_per_s']:.1f}" if ok else "-", res["wall_s"], res["loadavg_before"],
                     res["loadavg_after"], "" if ok else "  ERROR " + res["error"][-300:])  # fmt: skip
    out: dict[str, Any] = {"cells": cells}
    if cr_ok and any(c["system"] == "clip-retrieval" and "error" not in c for c in cells):
        out["clip_index"] = systems.clip_index(
            cr, work / "cr_emb", work / "cr_index", args.threads, args.timeout
        )
    return out


def run_search(
    args: argparse.Namespace,
    work: Path,
    model_file: Path,
    queries: list[str],
    cr_ok: bool,
    af_env: dict[str, str],
) -> dict[str, Any]:
    cr = peer("clip-retrieval")
    names = ["alignfuse", "clip-retrieval"] if cr_ok else ["alignfuse"]
    cells: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for name in _order(rep, names):
            if name == "alignfuse":
                srv = systems.serve_alignfuse(
                    work / "collections", model_file, queries, args.k, args.threads, af_env
                )
            else:
                srv = systems.serve_clip_back(
                    cr, work / "cr_index", model_file, queries, args.k, args.threads, work
                )
            try:
                servers.append({"system": name, "repeat": rep, "ready_s": srv.ready_s, **srv.settings})
                for conc in args.concurrency:
                    per_client = max(args.requests_per_client, -(-args.min_requests // conc))
                    res = closed_loop(srv.url, srv.make, conc, per_client)
                    cells.append({"system": name, "repeat": rep, "concurrency": conc, **res})
                    log.info("search %-14s rep %d conc %2d: %6.1f q/s p50 %7.1f p99 %7.1f ms err %d (load %s)",
                             name, rep, conc, res["throughput_rps"], res["p50_ms"] or -1, res["p99_ms"] or -1,
                             res["errors"], res["loadavg_after"])  # fmt: skip
            finally:
                srv.proc.stop()
    return {"cells": cells, "servers": servers}


def run_embed(
    args: argparse.Namespace, work: Path, images: Path, model_file: Path, queries: list[str], inf_ok: bool
) -> dict[str, Any]:
    inf = peer("infinity")
    texts = work / "texts.json"
    texts.write_text(json.dumps(queries))
    blobs = [p.read_bytes() for p in sorted(images.iterdir())]
    names = ["alignfuse", "infinity"] if inf_ok else ["alignfuse"]
    out: dict[str, Any] = {"cells": []}
    if inf_ok:
        out["model"] = save_hf_clip(inf, work / "hf_clip_vit_b32")
        out["model"].pop("dir", None)
    for rep in range(args.embed_repeats or args.repeats):
        for name in _order(rep, names):
            if name == "alignfuse":
                cmd = [
                    sys.executable, str(ROOT / "bench" / "_peers" / "af_embed.py"),
                    "--model", f"open_clip:ViT-B-32@{model_file}", "--images", str(images), "--texts", str(texts),
                    "--batch", str(args.embed_batch), "--seconds", str(args.duration), "--threads", str(args.threads),
                    "--runtime", args.runtime,
                ]  # fmt: skip
                res = systems._run_timed(
                    cmd, {**systems._base_env(args.threads), "PYTHONPATH": str(ROOT)}, args.timeout
                )
                if res["rc"] != 0:
                    cell = {"system": name, "repeat": rep, "error": res["output"][-2500:]}
                else:
                    r = json.loads(res["output"].strip().splitlines()[-1])
                    cell = {
                        "system": name, "repeat": rep, "path": "in-process encoder (decode + transform + forward)",
                        "images_per_s": r["image"]["items_per_s"], "texts_per_s": r["text"]["items_per_s"],
                        "image_batch_p50_ms": r["image"]["batch_p50_ms"], "text_batch_p50_ms": r["text"]["batch_p50_ms"],
                        "torch_threads": r["torch_threads"], "loadavg_before": r["loadavg_before"],
                        "loadavg_after": r["loadavg_after"],
                    }  # fmt: skip
                out["cells"].append(cell)
                log.info(
                    "embed %-10s rep %d: %s", name, rep, {k: v for k, v in cell.items() if k.endswith("_s")}
                )
                continue
            try:
                srv = systems.serve_infinity(inf, work / "hf_clip_vit_b32", args.threads, args.embed_batch)
            except RuntimeError as exc:
                out["cells"].append({"system": name, "repeat": rep, "error": str(exc)[-2500:]})
                log.error("infinity did not start: %s", str(exc)[-500:])
                continue
            try:
                cell = {"system": name, "repeat": rep, "path": "HTTP /embeddings", "ready_s": srv.ready_s}
                cell["check"] = systems.check_infinity(srv.url, work / "hf_clip_vit_b32", blobs[0])
                for modality in ("image", "text"):
                    make = systems.infinity_requests(
                        work / "hf_clip_vit_b32", modality, blobs, queries, args.embed_batch
                    )
                    res = closed_loop(srv.url, make, args.embed_concurrency, args.embed_requests)
                    cell[f"{modality}s_per_s"] = res["throughput_rps"] * args.embed_batch
                    cell[f"{modality}_request_p50_ms"] = res["p50_ms"]
                    cell[f"{modality}_errors"] = res["errors"]
                    cell[f"{modality}_loadavg"] = [res["loadavg_before"], res["loadavg_after"]]
                out["cells"].append(cell)
                log.info(
                    "embed %-10s rep %d: %s", name, rep, {k: v for k, v in cell.items() if k.endswith("_s")}
                )
            finally:
                srv.proc.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="scenes rendered (one image each)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every system")
    ap.add_argument("--batch", type=int, default=64, help="build batch size (both systems)")
    ap.add_argument("--workers", type=int, default=2, help="decode worker processes of both builds")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument(
        "--duration", type=float, default=15.0, help="seconds of alignfuse's in-process embed loop"
    )
    ap.add_argument("--requests-per-client", type=int, default=2, help="search requests each client sends")
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many search requests per cell")
    ap.add_argument("--embed-requests", type=int, default=4, help="/embeddings requests per infinity client")
    ap.add_argument(
        "--sections", default="build,search,embed", help="what to run (search needs a build in --work)"
    )
    ap.add_argument(
        "--merge", action="store_true", help="take the sections not run from the existing --out JSON"
    )
    ap.add_argument("--repeats", type=int, default=2, help="repeats of every cell, system order alternating")
    ap.add_argument(
        "--build-repeats", type=int, default=None, help="repeats of the build cells (default --repeats)"
    )
    ap.add_argument(
        "--embed-repeats", type=int, default=None, help="repeats of the embedding cells (default --repeats)"
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--embed-batch", type=int, default=32, help="inputs per embedding request / batch")
    ap.add_argument("--embed-concurrency", type=int, default=2, help="concurrent /embeddings requests")
    ap.add_argument(
        "--timeout", type=float, default=900, help="limit of each CLI run (they run under timeout)"
    )
    ap.add_argument(
        "--runtime", default="torch", help="alignfuse model runtime to pin (if settings have one)"
    )
    ap.add_argument(
        "--af-env", action="append", default=[], help="KEY=VALUE for alignfuse serve (repeatable)"
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="work folder (default: $ALIGNFUSE_PEERS_DIR/_work)"
    )
    ap.add_argument("--toy", action="store_true", help="tiny sizes: an end-to-end check, not a measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "peers.png")
    args = ap.parse_args()
    if args.toy:
        args.images, args.duration, args.repeats, args.min_requests, args.embed_requests = 8, 2.0, 1, 4, 1
        args.concurrency, args.embed_batch, args.batch = "1,4", 4, 4
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # this process only generates load
    t_all = time.perf_counter()
    load_start = loadavg()
    work = args.work or (
        Path(tempfile.mkdtemp(prefix="alignfuse-peers-")) if args.toy else peers_dir() / "_work"
    )
    work.mkdir(parents=True, exist_ok=True)
    images, queries = make_images(work / f"scenes{args.images}_{args.size}", args.images, args.size)
    model_file = save_open_clip(work / "open_clip_vit_b32_seed0.pt")
    runtime, runtime_env, build_args = alignfuse_runtime(args.runtime)
    args.af_build_args = build_args
    af_env = {
        "ALIGNFUSE_LIMITS__REQUEST_TIMEOUT_S": "300",
        "ALIGNFUSE_BATCHING__QUEUE_SIZE": "1024",
        # clip-back has no admission control and answers every request: so must alignfuse here (no 429s)
        "ALIGNFUSE_BATCHING__MAX_QUEUE_WAIT_MS": "0",
        **runtime_env,
        **dict(kv.split("=", 1) for kv in args.af_env),
    }
    peers: dict[str, Any] = {}
    for name in ("clip-retrieval", "infinity"):
        p = peer(name)
        peers[name] = {"installed": p.installed, "version": p.version}
        if not p.installed:
            peers[name]["skipped"] = p.skip_reason()
    cr_ok, inf_ok = peers["clip-retrieval"]["installed"], peers["infinity"]["installed"]

    results: dict[str, Any] = {"benchmark": "peers", "toy": args.toy, "peers": peers}
    sections = args.sections.split(",")
    skipped = {"cells": [], "skipped": "not run in this invocation (--sections)"}
    results["build"] = (
        run_build(args, work, images, model_file, cr_ok) if "build" in sections else dict(skipped)
    )
    if "build" not in sections and (work / "cr_index" / "image.index").is_file():
        results["build"]["clip_index"] = {"reused": "cr_index from an earlier run in the same work folder"}
    cr_index = results["build"].get("clip_index", {})
    cr_search_ok = cr_ok and ("error" not in cr_index or "fallback" in cr_index)
    if cr_ok and not cr_search_ok:
        peers["clip-retrieval"]["search_skipped"] = "clip-retrieval index failed: see build.clip_index"
    results["search"] = (
        run_search(args, work, model_file, queries, cr_search_ok, af_env)
        if "search" in sections
        else dict(skipped)
    )
    inf = peer("infinity")  # checked again here: its install may finish while the first stages run
    if inf.installed and not inf_ok:
        peers["infinity"] = {"installed": True, "version": inf.version}
        inf_ok = True
    results["embed"] = (
        run_embed(args, work, images, model_file, queries, inf_ok) if "embed" in sections else dict(skipped)
    )
    previous = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    for section in ("build", "search", "embed"):
        if section in sections:
            results[section]["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        elif section in previous and "skipped" not in previous[section]:
            results[section] = {**previous[section], "merged_from_previous_run": previous.get("date")}
            if section == "build":
                peers["clip-retrieval"]["build_version"] = previous["peers"]["clip-retrieval"].get("version")
    results["summary"] = summarise(results, args.concurrency)
    import faiss

    results["config"] = {
        "model": "open_clip ViT-B-32, random init (seed 0), one state_dict file for all",
        "model_file": model_file.name,
        "alignfuse_runtime": runtime,
        "alignfuse_build_args": args.af_build_args,
        "alignfuse_serve_env": af_env,
        "threads": args.threads,
        "build_batch": args.batch,
        "build_workers": args.workers,
        "concurrency": args.concurrency,
        "sections": sections,
        "embed_seconds_alignfuse": args.duration,
        "search_requests_per_client": args.requests_per_client,
        "search_min_requests": args.min_requests,
        "embed_requests_per_client": args.embed_requests,
        "repeats": args.repeats,
        "build_repeats": args.build_repeats or args.repeats,
        "embed_repeats": args.embed_repeats or args.repeats,
        "k": args.k,
        "embed_batch": args.embed_batch,
        "embed_concurrency": args.embed_concurrency,
    }
    results["images"] = {
        "count": args.images,
        "size": args.size,
        "format": "PNG",
        "source": "alignfuse scenes",
    }
    results["machine"] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "alignfuse": _version(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["git_commit"] = git_commit()
    results["work"] = rel(work) if not args.toy else "temporary"
    results["wall_s"] = time.perf_counter() - t_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {rel(args.out)} and {rel(args.plot)} in {results['wall_s']:.0f} s")


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alignfuse")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
