"""What a text→image rerank needs per collection item: stored image tokens or a ViT pass per query.

A collection built with ``alignfuse build --rerank-cache`` (``BuildOptions.rerank_cache``) stores each image's
fp16 ViT tokens (the feature cache, memory-mapped); one built without it keeps only the image files, and the
engine (``service/engine/rerank_inputs.py``) decodes each candidate's file, transforms it and runs the ViT on
the cross worker (recent tokens stay in a memory LRU, ``ALIGNFUSE_MODELS__RERANK_MEMORY_CACHE_MB``). This
script measures both sides so a user can choose:

* storage: bytes of fp16 tokens per image (base: 577 × 768), for 1M and 100M items, and the K/V cache's size
  per image if it were stored too;
* recompute: the per-candidate cost of that path on this CPU (JPEG decode + squash + normalise + ViT, measured)
  and on a GPU (ESTIMATE: the ViT's FLOPs ÷ an assumed achieved matmul rate, plus this CPU's decode time),
  times C candidates per query.

Usage::

    python bench/rerank_storage.py            # base config (ViT-B/16 at 384 px)
    python bench/rerank_storage.py --quick    # tiny config (the test)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import machine_info, resolve
from rerank import CONFIGS, timed

from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.model import AlbefModel

log = logging.getLogger("bench.rerank_storage")


def vit_flops(cfg: AlbefConfig) -> float:
    """Forward FLOPs (2 per multiply-add) of the ViT for one image: patch embedding, QKV/out/MLP matmuls,
    attention scores and weighted sums."""
    n, w = cfg.num_image_tokens, cfg.vision_width
    patch = 2 * cfg.num_patches * (3 * cfg.patch_size**2) * w
    per_layer = 2 * n * w * (4 * w + 2 * int(cfg.mlp_ratio * w)) + 2 * 2 * n * n * w
    return float(patch + cfg.vision_depth * per_layer)


def measure(
    name: str, cfg: AlbefConfig, candidates: list[int], gpu_tflops: float, repeats: int, batch: int
) -> dict[str, object]:
    from PIL import Image

    from alignfuse.models.albef.adapters import SquashTransform, albef_preprocess

    per_image = cfg.num_image_tokens * cfg.vision_width * 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AlbefModel(cfg).eval()
    transform = SquashTransform(albef_preprocess(cfg))
    g = torch.Generator().manual_seed(2)
    arr = (torch.rand(480, 640, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    def decode() -> torch.Tensor:  # what rerank_inputs does per candidate file
        return transform(Image.open(io.BytesIO(data)))

    def recompute() -> torch.Tensor:  # decode + ViT for `batch` candidates, tokens rounded to fp16
        pixels = torch.stack([decode() for _ in range(batch)])
        return model.image_tokens(pixels).to(torch.float16)

    with torch.inference_mode():
        best, _ = timed({"decode": decode, "recompute": recompute}, torch.device("cpu"), repeats)
    cpu_s = best["recompute"] / batch
    flops = vit_flops(cfg)
    gpu_s = flops / (gpu_tflops * 1e12) + best["decode"]
    kv_bytes = 2 * cfg.num_fusion_layers * cfg.num_image_tokens * cfg.hidden_size * 2
    return {
        "config": name,
        "token_shape": [cfg.num_image_tokens, cfg.vision_width],
        "bytes_per_image_fp16": per_image,
        "bytes_1M": per_image * 10**6,
        "bytes_100M": per_image * 10**8,
        "kv_bytes_per_image_fp16": kv_bytes,
        "kv_bytes_1M": kv_bytes * 10**6,
        "recompute_batch": batch,
        "recompute_cpu_s_per_image": cpu_s,
        "decode_cpu_s_per_image": best["decode"],
        "recompute_cpu_includes": "JPEG 640x480 decode + squash resize + normalise + ViT (fp32), tokens to fp16",
        "vit_gflops_per_image": flops / 1e9,
        "gpu_tflops_assumed": gpu_tflops,
        "recompute_gpu_s_per_image_estimate": gpu_s,
        "recompute_gpu_estimate": "ESTIMATE, not measured: ViT FLOPs / gpu_tflops_assumed (an achieved "
        "bf16 matmul rate) + this CPU's decode time per image (decode runs on the host, parallel over cores)",
        "per_query": [
            {
                "candidates": c,
                "stored_bytes_read": c * per_image,
                "recompute_cpu_s": c * cpu_s,
                "recompute_gpu_s_estimate": c * gpu_s,
            }
            for c in candidates
        ],
        "setting": "alignfuse build --rerank-cache / BuildOptions.rerank_cache: on = store the tokens (feature "
        "cache); off = recompute from the stored file per query (memory LRU "
        "ALIGNFUSE_MODELS__RERANK_MEMORY_CACHE_MB keeps recent ones)",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base")
    ap.add_argument("--candidates", default="16,64,128")
    ap.add_argument("--batch", type=int, default=2, help="images per ViT forward when timing the recompute")
    ap.add_argument(
        "--gpu-tflops", type=float, default=250.0, help="assumed achieved GPU matmul rate (TFLOP/s)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny config (the test)")
    ap.add_argument("--out", default="bench/results/rerank_storage.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.config, args.candidates, args.repeats = "tiny", "4,8", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    t0 = time.perf_counter()
    cs = [int(c) for c in args.candidates.split(",")]
    res = measure(args.config, CONFIGS[args.config], cs, args.gpu_tflops, args.repeats, args.batch)
    info["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "rerank inputs per collection item: stored fp16 image tokens vs ViT recompute per query",
        "machine": info,
        "total_s": time.perf_counter() - t0,
        "results": res,
    }
    out = resolve(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        "%s: %.0f KB/image, 1M %.0f GB, 100M %.1f TB; recompute %.3f s/image CPU, %.4f s GPU (estimate)",
        args.config, res["bytes_per_image_fp16"] / 1e3, res["bytes_1M"] / 1e9,  # type: ignore[operator]
        res["bytes_100M"] / 1e12, res["recompute_cpu_s_per_image"],  # type: ignore[operator]
        res["recompute_gpu_s_per_image_estimate"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
