"""alignfuse's dual-encoder path, timed from the bytes a client would send: image files → the service's own
decoder (``alignfuse.index.images.decode_image``) → the model's ``image_transform`` → ``encode_images``; texts
→ ``encode_texts``. In batches of ``--batch``, the embedding work an ``/embeddings`` request does in infinity.

Run as a subprocess of ``bench/peers.py`` (a fresh process with the benchmark's thread count)::

    python bench/_peers/af_embed.py --model open_clip:ViT-B-32@/abs/file.pt --images DIR --texts FILE.json \
        --batch 32 --seconds 20 --threads 2

Prints one JSON line: images/s and texts/s (and per-batch latency percentiles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _rate(fn, items: list, batch: int, seconds: float, warmup: int = 1) -> dict[str, float]:  # type: ignore[no-untyped-def,type-arg]
    """Run ``fn`` over consecutive batches of ``items`` (cycling) for about ``seconds``; items/s."""
    i = 0
    for _ in range(warmup):
        fn(items[:batch])
    lat: list[float] = []
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or not lat:
        chunk = [items[(i + j) % len(items)] for j in range(batch)]
        i += batch
        t = time.perf_counter()
        fn(chunk)
        lat.append(time.perf_counter() - t)
        n += batch
    wall = time.perf_counter() - t0
    arr = np.array(lat) * 1000
    return {
        "items": n,
        "seconds": wall,
        "items_per_s": n / wall,
        "batch_p50_ms": float(np.percentile(arr, 50)),
        "batch_p99_ms": float(np.percentile(arr, 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--texts", type=Path, required=True, help="JSON list of strings")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modalities", default="image,text")
    ap.add_argument("--runtime", default="torch", help="alignfuse model runtime (when the registry has one)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from alignfuse.index.images import decode_image
    from alignfuse.models.registry import create_dual_encoder

    t = time.perf_counter()
    import inspect

    has_runtime = "runtime" in inspect.signature(create_dual_encoder).parameters
    dual = (
        create_dual_encoder(args.model, runtime=args.runtime)
        if has_runtime
        else create_dual_encoder(args.model)
    )
    load_s = time.perf_counter() - t
    files = sorted(p for p in args.images.iterdir() if p.is_file())
    blobs = [p.read_bytes() for p in files]
    texts: list[str] = json.loads(args.texts.read_text())
    size = dual.info.preprocess.image_size

    def images(chunk: list[bytes]) -> None:
        pixels = torch.stack([dual.image_transform(decode_image(b, draft_size=size)) for b in chunk])
        dual.encode_images(pixels)

    out: dict[str, object] = {
        "model_load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "runtime": args.runtime if has_runtime else "torch",
        "batch": args.batch,
        "loadavg_before": list(os.getloadavg()),
    }
    mods = args.modalities.split(",")
    if "image" in mods:
        out["image"] = _rate(images, blobs, args.batch, args.seconds)
    if "text" in mods:
        out["text"] = _rate(dual.encode_texts, texts, args.batch, args.seconds)
    out["loadavg_after"] = list(os.getloadavg())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
