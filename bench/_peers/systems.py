"""Each system's side of ``bench/peers.py``: how it is built, served and queried, as a user would run it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .common import ROOT, Peer, Proc, RequestFn, free_port, loadavg, thread_env

ALIGNFUSE = [sys.executable, "-c", "from alignfuse.service.cli import main; main()"]


def _tail(text: str, n: int = 2500) -> str:
    return text[-n:]


def _run_timed(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> dict[str, Any]:
    """Run a command under ``timeout`` (its own process group, killed on expiry); wall time and load."""
    before = loadavg()
    started_at = time.time()
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        import os
        import signal

        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = None
    return {
        "wall_s": time.perf_counter() - t0,
        "started_at": started_at,
        "rc": rc,
        "timed_out": rc is None,
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "output": out,
    }


def _base_env(threads: int) -> dict[str, str]:
    import os

    return {**os.environ, **thread_env(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ build
def alignfuse_build(
    images: Path,
    model_file: Path,
    collection: Path,
    batch: int,
    workers: int,
    threads: int,
    timeout: float,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """``alignfuse build`` (the CLI, a fresh process) over the image folder: encode, store, index, commit."""
    shutil.rmtree(collection, ignore_errors=True)
    cmd = [
        *ALIGNFUSE, "build", str(collection), "--images", str(images),
        "--model", f"open_clip:ViT-B-32@{model_file}", "--batch-size", str(batch),
        "--workers", str(workers), "--no-progress", *(extra or []),
    ]  # fmt: skip
    res = _run_timed(cmd, {**_base_env(threads), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}, timeout)
    m = re.search(r"added ([\d,]+) \(([\d,]+) images.*?([\d.,]+)s \(([\d.,]+) items/s\)", res["output"], re.S)
    out = {k: v for k, v in res.items() if k not in ("output", "started_at")}
    if m:
        out["images"] = int(m.group(2).replace(",", ""))
        out["reported_s"] = float(m.group(3).replace(",", ""))
        out["reported_images_per_s"] = float(m.group(4).replace(",", ""))
    if res["rc"] != 0 or not m:
        out["error"] = _tail(res["output"])
    return out


def clip_inference(
    peer: Peer,
    images: Path,
    model_file: Path,
    out_dir: Path,
    batch: int,
    workers: int,
    threads: int,
    timeout: float,
) -> dict[str, Any]:
    """``clip-retrieval inference`` (a fresh process) over the same image-only folder, under ``timeout``."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        peer.bin("clip-retrieval"), "inference",
        "--input_dataset", str(images), "--output_folder", str(out_dir),
        "--clip_model", f"open_clip:ViT-B-32/{model_file}",
        "--input_format", "files", "--enable_text", "False", "--enable_image", "True",
        "--enable_metadata", "False", "--batch_size", str(batch), "--num_prepro_workers", str(workers),
        "--use_jit", "False", "--enable_wandb", "False", "--use_mclip", "False",
    ]  # fmt: skip
    res = _run_timed(cmd, _base_env(threads), timeout)
    out = {k: v for k, v in res.items() if k not in ("output", "started_at")}
    embs = sorted((out_dir / "img_emb").glob("img_emb_*.npy")) if (out_dir / "img_emb").is_dir() else []
    n = 0
    if embs:
        import numpy as np

        n = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in embs)
    out["images"] = n
    stats = sorted((out_dir / "stats").glob("*.json")) if (out_dir / "stats").is_dir() else []
    if stats:  # its own account, after start-up and its warm-up batch: the steady-state rate
        st = [json.loads(p.read_text()) for p in stats]
        total = sum(x["total_duration"] for x in st)
        out["reported_s"] = total
        out["reported_images_per_s"] = sum(x["sample_count"] for x in st) / total if total else None
        out["reported_inference_s"] = sum(x["inference_duration"] for x in st)
        out["reported_read_s"] = sum(x["read_duration"] for x in st)
    if res["timed_out"] and n and out.get("reported_images_per_s"):
        # its known failure mode: the output is complete, then the process hangs; count up to the last file
        last = max(p.stat().st_mtime for p in out_dir.rglob("*") if p.is_file())
        out["hung_after_output"] = True
        out["wall_s"] = last - res["started_at"]
    elif res["rc"] != 0 or n == 0:
        out["error"] = _tail(res["output"])
    return out


def clip_index(peer: Peer, emb_dir: Path, index_dir: Path, threads: int, timeout: float) -> dict[str, Any]:
    """``clip-retrieval index`` (autofaiss) over its own inference output, for ``clip-retrieval back``."""
    shutil.rmtree(index_dir, ignore_errors=True)
    cmd = [
        peer.bin("clip-retrieval"), "index", "--embeddings_folder", str(emb_dir),
        "--index_folder", str(index_dir), "--max_index_memory_usage", "4G", "--current_memory_available", "8G",
        "--nb_cores", str(threads),
    ]  # fmt: skip
    res = _run_timed(cmd, _base_env(threads), timeout)
    out = {k: v for k, v in res.items() if k not in ("output", "started_at")}
    if res["rc"] != 0 or not (index_dir / "image.index").is_file():
        out["error"] = _tail(res["output"])
        out["fallback"] = _flat_index(emb_dir, index_dir)
    return out


def _flat_index(emb_dir: Path, index_dir: Path) -> str:
    """When ``clip-retrieval index`` fails: the layout it writes (``image.index`` + ``metadata/``), with an
    exact inner-product index over its own embeddings, built here (labelled as such in the JSON)."""
    import faiss
    import numpy as np

    embs = np.concatenate([np.load(p) for p in sorted((emb_dir / "img_emb").glob("img_emb_*.npy"))])
    index = faiss.IndexFlatIP(embs.shape[1])
    index.add(embs.astype(np.float32))
    index_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(index_dir / "image.index"))
    shutil.rmtree(index_dir / "metadata", ignore_errors=True)
    shutil.copytree(emb_dir / "metadata", index_dir / "metadata")
    return "IndexFlatIP over clip-retrieval's own embeddings, written by the benchmark (not clip-retrieval index)"


# ----------------------------------------------------------------------------------------------- servers
@dataclass
class Served:
    """A running server and how to query it."""

    name: str
    proc: Proc
    url: str
    ready_s: float
    make: RequestFn
    settings: dict[str, Any]


def serve_alignfuse(
    collections: Path,
    model_file: Path,
    queries: list[str],
    k: int,
    threads: int,
    env_extra: dict[str, str],
) -> Served:
    """``alignfuse serve`` on 127.0.0.1 with rerank off (``--reranker none``)."""
    port = free_port()
    cmd = [
        *ALIGNFUSE, "serve", "--host", "127.0.0.1", "--port", str(port), "--collections", str(collections),
        "--model", f"open_clip:ViT-B-32@{model_file}", "--reranker", "none", "--log-level", "warning",
    ]  # fmt: skip
    env = {**thread_env(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env_extra}
    proc = Proc(cmd, env).start()
    url = f"http://127.0.0.1:{port}"
    ready = proc.wait_http(url + "/readyz", 600, lambda r: r.status_code == 200)
    coll = collections.name if (collections / "manifest.json").is_file() else None
    name = coll or next(p.name for p in collections.iterdir() if (p / "manifest.json").is_file())

    def make(i: int) -> tuple[str, dict[str, Any]]:
        return "/v1/search", {"collection": name, "text": queries[i % len(queries)], "k": k, "rerank": False}

    return Served("alignfuse", proc, url, ready, make, {"env": env_extra, "reranker": "none"})


def serve_clip_back(
    peer: Peer, index_dir: Path, model_file: Path, queries: list[str], k: int, threads: int, work: Path
) -> Served:
    """``clip-retrieval back`` (through ``clip_back_local.py``: bound to 127.0.0.1) over its own index."""
    port = free_port()
    paths = work / "indices_paths.json"
    paths.write_text(json.dumps({"bench": str(index_dir)}))
    cmd = [
        peer.bin("python"), str(ROOT / "bench" / "_peers" / "clip_back_local.py"),
        "--port", str(port), "--indices_paths", str(paths), "--clip_model", f"open_clip:ViT-B-32/{model_file}",
        "--enable_mclip_option", "False", "--provide_aesthetic_embeddings", "False", "--use_jit", "False",
        "--provide_safety_model", "False", "--provide_violence_detector", "False", "--enable_hdf5", "False",
        "--enable_faiss_memory_mapping", "False", "--columns_to_return", '["image_path"]',
    ]  # fmt: skip
    env = {**thread_env(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = Proc(cmd, env, cwd=work).start()
    url = f"http://127.0.0.1:{port}"
    ready = proc.wait_http(url + "/indices-list", 600, lambda r: r.status_code == 200)

    def make(i: int) -> tuple[str, dict[str, Any]]:
        return "/knn-service", {
            "text": queries[i % len(queries)], "modality": "image", "num_images": k, "indice_name": "bench",
            "use_mclip": False, "deduplicate": False, "use_safety_model": False,
            "use_violence_detector": False, "aesthetic_score": "", "aesthetic_weight": "",
        }  # fmt: skip

    return Served("clip-retrieval back", proc, url, ready, make, {"columns_to_return": ["image_path"]})


def serve_infinity(peer: Peer, model_dir: Path, threads: int, batch: int) -> Served:
    """``infinity_emb v2 --engine torch --device cpu`` on 127.0.0.1 over the saved transformers CLIPModel."""
    port = free_port()
    cmd = [
        peer.bin("infinity_emb"), "v2", "--model-id", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--engine", "torch", "--device", "cpu", "--batch-size", str(batch),
        "--no-bettertransformer",
    ]  # fmt: skip
    env = {
        **thread_env(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    proc = Proc(cmd, env).start()
    url = f"http://127.0.0.1:{port}"
    ready = proc.wait_http(url + "/health", 600, lambda r: r.status_code == 200)

    def make(i: int) -> tuple[str, dict[str, Any]]:  # replaced per modality by embed_requests
        raise NotImplementedError

    return Served("infinity", proc, url, ready, make, {"batch_size": batch, "engine": "torch"})


def infinity_requests(
    model_dir: Path, modality: str, images: list[bytes], texts: list[str], per_request: int
) -> RequestFn:
    """``/embeddings`` requests of ``per_request`` inputs (images as base64 PNG data URIs)."""
    uris = ["data:image/png;base64," + base64.b64encode(b).decode() for b in images]
    pool: list[str] = uris if modality == "image" else texts

    def make(i: int) -> tuple[str, dict[str, Any]]:
        start = i * per_request
        inputs = [pool[(start + j) % len(pool)] for j in range(per_request)]
        return "/embeddings", {"model": str(model_dir), "input": inputs, "modality": modality}

    return make


def check_infinity(url: str, model_dir: Path, image: bytes) -> dict[str, Any]:
    """One text and one image request: the dimensions infinity answers with (fails loudly on a 500)."""
    out: dict[str, Any] = {}
    for modality, item in (
        ("text", "a red circle"),
        ("image", "data:image/png;base64," + base64.b64encode(image).decode()),
    ):
        r = httpx.post(
            url + "/embeddings",
            json={"model": str(model_dir), "input": [item], "modality": modality},
            timeout=300,
        )
        if r.status_code != 200:
            raise RuntimeError(f"infinity {modality} embedding: HTTP {r.status_code}: {r.text[:500]}")
        out[f"{modality}_dim"] = len(r.json()["data"][0]["embedding"])
    return out
