"""Probe whether a trained ALBEF *reads* attributes at the right object on unseen (colour, shape) pairs.

    OMP_NUM_THREADS=1 .venv/bin/python docs/training/probe_binding.py runs/albefh/checkpoint.pth \
        runs/cfg/scenes-albef-c.json runs/data2/val/scenes.json runs/data2/compval/scenes.json

For the first ``--images`` images of each split and three captions each, masks *all* colour words of the
caption at once (then all shape words) and asks the MLM head of the training checkpoint to fill them in from the
image, restricted to the colour (shape) vocabulary. With every colour masked, "a [MASK] triangle left of a
[MASK] square" can only be completed by finding each shape and reading its colour: binding, measured without
the ITM head. Chance: 1/8 for colours, 1/6 for shapes. Prints one JSON line per split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from alignfuse.data.scenes import COLOURS, SHAPES
from alignfuse.models.albef.config import get_albef_config
from alignfuse.models.text import AlbefTokenizer
from alignfuse.training import load_pairs
from alignfuse.training.objectives_albef import AlbefForTraining, AlbefTrainingOptions

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="runs/<run>/checkpoint.pth (needs the MLM head)")
    ap.add_argument("config", help="the AlbefConfig JSON the run trained with")
    ap.add_argument("splits", nargs="+", type=Path)
    ap.add_argument("--images", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = get_albef_config(args.config).replace(vocab=str(ROOT / "models" / "weights" / "vocab.txt"))
    tok = AlbefTokenizer(cfg.vocab, max_len=cfg.max_text_len)
    cfg = cfg.replace(vocab_size=tok.vocab_size)
    blob = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"]
    opts = AlbefTrainingOptions(
        queue_size=int(blob["image_queue"].shape[1]),
        mlm=True,
        special_ids=(tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id),
    )
    model = AlbefForTraining(cfg, opts)
    model.load_state_dict(blob)
    model.eval()
    vocab = tok.tokenizer.vocab
    groups = {"colour": [vocab[c] for c in COLOURS], "shape": [vocab[s] for s in SHAPES]}
    for split in args.splits:
        data = load_pairs(split, None, cfg.image_res)
        hits: dict[str, list[int]] = {g: [] for g in groups}
        with torch.no_grad():
            for i in range(min(args.images, data.num_images)):
                kv = model.cross_kv(model.image_tokens(data.pixels([i])))
                for k in data.captions_of[i][:3]:
                    ids, mask = tok([data.captions[k]])
                    t = int(mask.sum())
                    ids, mask = ids[:, :t], mask[:, :t]
                    for g, gids in groups.items():
                        pos = [p for p in range(t) if int(ids[0, p]) in gids]
                        if not pos:
                            continue
                        masked = ids.clone()
                        masked[0, pos] = tok.mask_id
                        hidden = model.fuse(model.text_states(masked, mask), mask, None, kv)
                        logits = model.text_encoder.cls(hidden[0, pos])[:, gids]
                        pred = [gids[int(j)] for j in logits.argmax(-1)]
                        hits[g] += [int(a == int(ids[0, p])) for a, p in zip(pred, pos, strict=True)]
        row = {"split": str(split), "checkpoint": args.checkpoint}
        row.update({f"{g}_acc": round(float(np.mean(v)), 3) for g, v in hits.items()})
        row.update({f"{g}_n": len(v) for g, v in hits.items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
