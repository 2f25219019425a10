"""Export a training checkpoint (``runs/<run>/checkpoint.pth``) as shippable weights.

    .venv/bin/python docs/training/export_checkpoint.py albef runs/albef/checkpoint.pth \
        runs/cfg/scenes-albef-train.json models/weights/scenes-albef
    .venv/bin/python docs/training/export_checkpoint.py clip runs/clip/checkpoint.pth \
        runs/cfg/scenes-clip.json models/weights/scenes-clip

ALBEF: ``<stem>.safetensors`` in the released retrieval layout + ``<stem>.json`` (AlbefConfig, vocab
"vocab.txt" beside it). CLIP: ``<stem>.safetensors`` (open_clip state_dict) + ``<stem>.json`` (open_clip
model config).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignfuse.models.albef.config import AlbefConfig
from alignfuse.training.objectives_albef import inference_state_dict


def main() -> None:
    kind, ckpt, cfg_path, stem = sys.argv[1:5]
    out = Path(stem)
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = blob["model"]
    if kind == "albef":
        sd = {k: v.float().contiguous() for k, v in inference_state_dict(state).items()}
        cfg = AlbefConfig.from_json(cfg_path).to_dict()
        cfg["vocab"] = "vocab.txt"
        meta = {"format": "pt", "layout": "albef-retrieval", "step": str(blob["step"])}
    else:
        sd = {k: v.float().contiguous() for k, v in state.items()}
        cfg = json.loads(Path(cfg_path).read_text())
        meta = {"format": "pt", "layout": "open_clip", "step": str(blob["step"])}
    save_file(sd, str(out.with_suffix(".safetensors")), metadata=meta)
    out.with_suffix(".safetensors").chmod(0o644)
    out.with_suffix(".json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(out.with_suffix(".safetensors"), out.with_suffix(".json"), "step", blob["step"])


if __name__ == "__main__":
    main()
