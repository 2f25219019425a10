"""Measure an exported ALBEF on the validation splits with every score fusion; optionally record the choice.

    OMP_NUM_THREADS=1 .venv/bin/python docs/training/choose_fusion.py models/weights/scenes-albef \
        runs/data2/val/scenes.json runs/data2/compval/scenes.json --write

For each split: ALBEF's protocol (alignfuse.evaluation.evaluate) with the model's ITC as the dual encoder and a
top-``k`` ITM rerank with each fusion of :data:`alignfuse.models.base.FUSIONS`: ``"itm"`` (ALBEF), ``"itm+itc"``
(BLIP/LAVIS) and ``"itm+itc_logit"`` (logit + cosine / ITC temperature). Prints one
JSON line per (split, fusion). The choice is the fusion with the higher mean rerank R@1 over every split and
both directions. Use validation data only (held-out seed 2 and compositional seed 5 in docs/training): the
test splits report the result and never pick it. ``--write`` records the measurements and the choice in
``<stem>.fusion.json``, which ``alignfuse:scenes-albef`` reads as its default fusion.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from alignfuse.data.scenes import caption_matches
from alignfuse.evaluation import evaluate
from alignfuse.models.base import FUSIONS
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stem", help="<stem>.json + <stem>.safetensors (an exported ALBEF)")
    ap.add_argument("splits", nargs="+", type=Path, help="Karpathy-style scenes.json files (validation)")
    ap.add_argument("-k", type=int, default=16, help="rerank depth k_test (default 16, as the demo)")
    ap.add_argument("--write", action="store_true", help="write <stem>.fusion.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    spec = f"albef:{args.stem}.json@{args.stem}.safetensors"
    dual, cross = create_dual_encoder(spec), create_cross_encoder(spec)
    rows = []
    for split in args.splits:
        for fusion in FUSIONS:
            t0 = time.perf_counter()
            rep = evaluate(
                None,
                split,
                None,
                dual,
                cross,
                ("dual", "rerank"),
                args.k,
                256,
                fusion=fusion,
                truth=caption_matches,
            )
            res = rep.to_json()
            row = {
                "split": str(split),
                "fusion": fusion,
                "k_test": args.k,
                "images": res["meta"]["n_images"],
                **{f"dual_{m}": res["dual"][m] for m in ("tr_r1", "ir_r1")},
                **{f"rerank_{m}": res["rerank"][m] for m in ("tr_r1", "ir_r1", "r_mean")},
                "rerank_group_acc_t2i": res["rerank"].get("group_acc_t2i"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    score = {
        f: round(
            sum(r["rerank_tr_r1"] + r["rerank_ir_r1"] for r in rows if r["fusion"] == f)
            / (2 * len(args.splits)),
            2,
        )
        for f in FUSIONS
    }
    choice = max(FUSIONS, key=lambda f: (score[f], f == "itm"))  # ties: ALBEF's own
    print(json.dumps({"mean_rerank_r1": score, "default_fusion": choice}))
    if args.write:
        out = Path(f"{args.stem}.fusion.json")
        blob = {
            "default_fusion": choice,
            "criterion": "higher mean rerank R@1 (TR and IR) over the validation splits below",
            "weights_sha256_prefix": cross.info.weights_sha256[:12],
            "mean_rerank_r1": score,
            "measurements": rows,
        }
        out.write_text(json.dumps(blob, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
