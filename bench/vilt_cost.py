"""What a rerank of C candidates costs with ViLT (single-stream) vs ALBEF (align before fuse).

Both through the project's adapters (``create_cross_encoder``) on random weights of the real architectures:

* ``vilt``: ``ViltForImageAndTextRetrieval`` (ViLT-B/32: 12 layers of width 768 over 40 text tokens + the
  image's 32 px patches); every pair is one full pass from the pixels, nothing can be cached;
* ``albef_cached``: ALBEF's fusion layers only, the image tokens given (the collection's feature cache) and
  the text layers run once per query: what the service pays per candidate;
* ``albef_pixels``: ALBEF without a cache: the ViT over every candidate's pixels, then the fusion.

FLOPs per pair are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; 2 FLOPs
per multiply-add) on one pair; pairs/s are measured with one text × C images, best of ``--repeats``.

Usage::

    python bench/vilt_cost.py --candidates 8 --out bench/results/vilt_cost.json
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
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfuse.models.base import CrossEncoder
from alignfuse.models.registry import create_cross_encoder

log = logging.getLogger("bench.vilt_cost")

TEXT = "a small red circle left of a large blue square"

# ViLT sizes: base = ViLT-B/32 (ViltConfig defaults, the dandelin checkpoints); tiny = ALBEF tiny's widths
VILT_SIZES: dict[str, dict[str, Any]] = {
    "base": {"image_size": 384, "shorter": 384},
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "image_size": 64,
        "patch_size": 16,
        "shorter": 64,
        "divisor": 16,
    },
}
ALBEF_SIZES = {"base": "base", "tiny": "tiny"}


def albef_cross(size: str) -> CrossEncoder:
    """Random-init ALBEF of ``size`` through the project's adapter. The base model's BERT vocabulary cannot be
    downloaded here, so the shipped tiny WordPiece vocabulary tokenises the text (same model sizes; the
    query's token count differs by a few pieces)."""
    from dataclasses import replace

    from alignfuse.models.albef.adapters import AlbefCrossEncoder, build_albef
    from alignfuse.models.albef.config import ALBEF_CONFIGS, TINY_VOCAB

    config = replace(ALBEF_CONFIGS[ALBEF_SIZES[size]], vocab=TINY_VOCAB)
    bundle = build_albef(config, None, spec=f"albef:{size}")
    return AlbefCrossEncoder(
        bundle, bundle.info(f"albef:{size}", size, f"ALBEF {size} (random)", kind="cross")
    )


def save_vilt(size: str, out: Path) -> Path:
    """A random-init ViLT of ``size`` with a real BERT-sized vocabulary stand-in, saved for ``vilt:<dir>``."""
    from transformers import (
        BertTokenizer,
        ViltConfig,
        ViltForImageAndTextRetrieval,
        ViltImageProcessor,
        ViltProcessor,
    )

    cfg = dict(VILT_SIZES[size])
    shorter, divisor = cfg.pop("shorter"), cfg.pop("divisor", 32)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *sorted(set(TEXT.split())),
        *[f"w{i}" for i in range(64)],
    ]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = ViltConfig(vocab_size=30522, **cfg)
    torch.manual_seed(0)
    ViltForImageAndTextRetrieval(config).save_pretrained(out)
    image_processor = ViltImageProcessor(size={"shortest_edge": shorter}, size_divisor=divisor)  # type: ignore[call-arg]
    ViltProcessor(image_processor, tokenizer).save_pretrained(out)
    return out


def _images(n: int, side: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name: str, enc: CrossEncoder, c: int, repeats: int, side: int) -> list[dict[str, Any]]:
    pixels = torch.stack([enc.image_transform(im) for im in _images(c, side)])
    ts = enc.text_states([TEXT])
    rows: list[dict[str, Any]] = []
    if enc.info.image_states_cacheable:
        with torch.inference_mode():
            tokens = enc.image_states(pixels).tokens.to(torch.float16)
        variants: dict[str, Callable[[int], Any]] = {
            "albef_cached": lambda n: enc.score(ts, enc.image_states_from_tokens(tokens[:n])),
            "albef_pixels": lambda n: enc.score(enc.text_states([TEXT]), enc.image_states(pixels[:n])),
        }
    else:
        variants = {"vilt": lambda n: enc.score(enc.text_states([TEXT]), enc.image_states(pixels[:n]))}
    for variant, fn in variants.items():
        flops = _flops(lambda fn=fn: fn(1))  # type: ignore[misc]
        fn(1)  # warm-up
        secs = _best(lambda fn=fn: fn(c), repeats)  # type: ignore[misc]
        rows.append(
            {
                "model": name,
                "variant": variant,
                "spec": enc.info.spec,
                "candidates": c,
                "gflops_per_pair": round(flops / 1e9, 4),
                "seconds": round(secs, 4),
                "pairs_per_s": round(c / secs, 2),
            }
        )
        log.info("%s", rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--candidates", type=int, default=8, help="C: pairs per rerank (one text x C images)")
    ap.add_argument("--tiny-candidates", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vilt_cost.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            c = args.tiny_candidates if size == "tiny" else args.candidates
            side = 64 if size == "tiny" else 384
            vilt = create_cross_encoder(f"vilt:{save_vilt(size, Path(tmp) / size)}")
            # the random-init ViLT lives in a temporary directory: record what it is, not where it was
            rows += [
                dict(r, size=size, spec=f"vilt:<random-init {size}, saved to a temporary directory>")
                for r in measure("vilt", vilt, c, args.repeats, side)
            ]
            del vilt
            albef = albef_cross(size)
            rows += [dict(r, size=size) for r in measure("albef", albef, c, args.repeats, side)]
            del albef
    import transformers

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "text": TEXT,
        "image": "random square images (ViLT: 384x384 → 12x12 patches of 32 px at base; ALBEF: 384 px squash, "
        "24x24 patches of 16 px)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['size']:5} {r['variant']:13} {r['gflops_per_pair']:9.3f} GFLOPs/pair {r['pairs_per_s']:9.2f} pairs/s"
        )


if __name__ == "__main__":
    main()
