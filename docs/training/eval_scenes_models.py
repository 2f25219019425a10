"""Evaluate the shipped scenes models (or a run's checkpoint) on scenes splits.

    OMP_NUM_THREADS=1 .venv/bin/python docs/training/eval_scenes_models.py \
        --albef models/weights/scenes-albef --clip models/weights/scenes-clip \
        runs/data/test/scenes.json runs/data/compositional/scenes.json

Prints one JSON line per (split, stage-1 model): ITC R@1 of the stage-1 model, R@1 after a top-k ALBEF ITM
rerank, ITM accuracies and accuracy inside hard-negative groups (the protocol's ``group_acc_*``, for the
stage-1 scores as ``dual_group_acc_*`` and the rerank's as ``rerank_group_acc_*``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch
from open_clip import factory
from safetensors.torch import load_file

from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.model import AlbefModel
from alignfuse.models.text import AlbefTokenizer
from alignfuse.training import AlbefArch, ClipArch, TrainOptions, diagnose, load_pairs
from alignfuse.training.objectives_albef import inference_state_dict


def albef_arch(stem: str, checkpoint: str | None) -> AlbefArch:
    cfg = AlbefConfig.from_json(stem + ".json")
    model = AlbefModel(cfg)
    if checkpoint:
        sd = inference_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    else:
        sd = load_file(stem + ".safetensors")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return AlbefArch(
        model.eval(), AlbefTokenizer(cfg.vocab, max_len=cfg.max_text_len), TrainOptions(), torch.device("cpu")
    )


def clip_arch(stem: str, checkpoint: str | None) -> ClipArch:
    cfg = json.loads(Path(stem + ".json").read_text())
    factory._MODEL_CONFIGS["eval-scenes-clip"] = cfg
    model = open_clip.create_model("eval-scenes-clip", pretrained=None)
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    else:
        model.load_state_dict(load_file(stem + ".safetensors"))
    return ClipArch(
        model.eval(), open_clip.get_tokenizer("eval-scenes-clip"), cfg, TrainOptions(), torch.device("cpu")
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("splits", nargs="+")
    ap.add_argument("--albef", required=True, help="stem of <stem>.json + <stem>.safetensors")
    ap.add_argument("--albef-checkpoint")
    ap.add_argument("--clip", help="stem of <stem>.json + <stem>.safetensors")
    ap.add_argument("--clip-checkpoint")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("-k", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    albef = albef_arch(args.albef, args.albef_checkpoint)
    clip = clip_arch(args.clip, args.clip_checkpoint) if args.clip else None
    for split in args.splits:
        data = load_pairs(Path(split), None, albef.model.config.image_res)
        for name, dual in (("albef-itc", None), ("scenes-clip", clip)):
            if name == "scenes-clip" and dual is None:
                continue
            res = diagnose(albef, data, max_images=args.images, rerank_k=args.k, dual=dual)
            print(json.dumps({"split": split, "stage1": name, "k": args.k, **res.as_dict()}), flush=True)


if __name__ == "__main__":
    main()
