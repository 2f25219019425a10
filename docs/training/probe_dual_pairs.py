"""Quick dual-encoder P@5 probe of a checkpoint mid-run: "a {colour} {shape}" for every pair drawn on a scenes
split, truth-aware (a hit is any image holding the pair), without building a collection. Prints one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python docs/training/probe_dual_pairs.py \\
        albef:runs/cfg/scenes-albef-hybrid.json@runs/n/checkpoint.pth runs/data2/val/scenes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alignfuse.data.scenes import fix_articles
from alignfuse.models.registry import create_dual_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="dual-encoder spec, e.g. albef:<config.json>@<checkpoint.pth>")
    ap.add_argument("scenes", type=Path, help="a scenes.json (Karpathy-style, with drawn objects)")
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    enc = create_dual_encoder(args.spec)
    rows = json.loads(args.scenes.read_text())
    tf = enc.image_transform
    embs = []
    for s in range(0, len(rows), 100):
        px = [tf(Image.open(args.scenes.parent / r["image"]).convert("RGB")) for r in rows[s : s + 100]]
        embs.append(enc.encode_images(torch.stack(px)))
    img = np.concatenate(embs)
    holders: dict[tuple[str, str], set[int]] = {}
    for i, r in enumerate(rows):
        for o in r["objects"]:
            holders.setdefault((o["colour"], o["shape"]), set()).add(i)
    keys = sorted(holders)
    txt = enc.encode_texts([fix_articles(f"a {c} {s}") for c, s in keys])
    top = np.argsort(-(txt @ img.T), axis=1)[:, : args.k]
    p = [float(np.mean([int(j) in holders[k] for j in row])) for k, row in zip(keys, top, strict=True)]
    print(
        json.dumps(
            {"spec": args.spec, "images": len(rows), "pairs": len(keys), "p_at_k": round(np.mean(p), 3)}
        )
    )


if __name__ == "__main__":
    main()
