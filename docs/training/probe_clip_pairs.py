"""Dual-encoder P@5 of a CLIP trained by ``alignfuse train --arch clip`` (its open_clip config JSON + safetensors) on
a scenes split: "a {colour} {shape}" for every pair drawn there and "a {shape}" for every shape, truth-aware (a hit
is any image holding it). Prints one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python docs/training/probe_clip_pairs.py \\
        runs/clipn/w16/scenes-clip-w16.json runs/clipn/w16/scenes-clip-w16.safetensors runs/data2/val/scenes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import factory
from safetensors.torch import load_file

from alignfuse.data.scenes import fix_articles
from alignfuse.training.data import load_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="open_clip model config JSON")
    ap.add_argument("weights", help="open_clip state_dict (.safetensors)")
    ap.add_argument("scenes", type=Path, help="a scenes.json (Karpathy-style, with drawn objects)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads(args.config.read_text())
    factory._MODEL_CONFIGS["probe-clip"] = cfg
    model = open_clip.create_model("probe-clip", pretrained=None)
    model.load_state_dict(load_file(args.weights))
    model.eval()
    tok = open_clip.get_tokenizer("probe-clip")
    data = load_pairs(args.scenes, None, cfg["vision_cfg"]["image_size"])
    rows = json.loads(args.scenes.read_text())
    with torch.no_grad():
        img = torch.cat(
            [
                F.normalize(
                    model.encode_image(data.pixels(list(range(s, min(s + 100, data.num_images))))), dim=-1
                )
                for s in range(0, data.num_images, 100)
            ]
        )
    queries: dict[str, dict[str, set[int]]] = {"pairs": {}, "shapes": {}}
    for i, r in enumerate(rows):
        for o in r["objects"]:
            queries["pairs"].setdefault(fix_articles(f"a {o['colour']} {o['shape']}"), set()).add(i)
            queries["shapes"].setdefault(fix_articles(f"a {o['shape']}"), set()).add(i)
    out: dict[str, object] = {"weights": args.weights, "images": len(rows)}
    for kind, holders in queries.items():
        keys = sorted(holders)
        with torch.no_grad():
            txt = F.normalize(model.encode_text(tok(keys)), dim=-1)
        top = (txt @ img.T).topk(5, dim=1).indices
        p = [float(np.mean([int(j) in holders[k] for j in row])) for k, row in zip(keys, top, strict=True)]
        out[kind] = round(float(np.mean(p)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
