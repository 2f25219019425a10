"""Turn shipped ALBEF weights into a training checkpoint for ``alignfuse train --init-from`` under a changed
config (e.g. ``patch_stem`` "linear" → "conv"): every tensor whose name and shape still fit is copied (also into
the momentum copies), the rest (the new stem, an MLM head the released layout lacks) keeps its fresh init.

    python docs/training/warm_start.py SHIPPED.safetensors NEW_CONFIG.json OUT.pth [--mlm] [--queue-size N]
        [--fit-stem TRAIN_SCENES.json --fit-steps 300]

``--fit-stem``: a new convolutional stem (``patch_stem="conv"``) is first fitted (MSE, a few hundred steps) to
reproduce the shipped linear patch embedding on training images, so the trained transformer above it sees the
inputs it knows. Without it, the random stem wrecks the image features and the ITM head collapses to "no match"
in the first few hundred steps of the next stage (measured: run A, positives accepted 0% at step 331).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignfuse.models.albef.config import AlbefConfig
from alignfuse.training.data import load_pairs
from alignfuse.training.objectives_albef import AlbefForTraining, AlbefTrainingOptions

log = logging.getLogger("warm_start")


def source_key(key: str) -> list[str]:
    base = key
    for m in ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"):
        if base.startswith(m + "."):
            base = m[:-2] + base[len(m) :]
    return [base, base.replace("text_encoder.bert.", "text_encoder.")]


def fit_stem(model: AlbefForTraining, shipped: dict[str, torch.Tensor], scenes: Path, steps: int) -> None:
    """Train ``model``'s conv stem to output what the shipped linear patch embedding outputs (MSE)."""
    w = shipped["visual_encoder.patch_embed.proj.weight"]
    b = shipped["visual_encoder.patch_embed.proj.bias"]
    res = model.config.image_res
    data = load_pairs(scenes, None, res, limit=2000)
    stem = model.visual_encoder.patch_embed
    opt = torch.optim.Adam(stem.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = data.pixels(torch.randint(0, data.num_images, (64,), generator=g))
        with torch.no_grad():
            target = F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)
        loss = F.mse_loss(stem(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            rel = float(loss / target.pow(2).mean())
            log.info("stem fit step %d: mse %.5f (relative %.4f)", step, float(loss), rel)
    model.visual_encoder_m.patch_embed.load_state_dict(stem.state_dict())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument(
        "--mlm", action="store_true", help="The training run uses MLM (its text encoder has the head)."
    )
    ap.add_argument("--queue-size", type=int, default=2048, help="The training run's --queue-size.")
    ap.add_argument(
        "--fit-stem", type=Path, help="Fit a new conv stem to the shipped linear one on these images."
    )
    ap.add_argument("--fit-steps", type=int, default=300)
    args = ap.parse_args()
    shipped = load_file(args.weights)
    model = AlbefForTraining(
        AlbefConfig.from_json(args.config), AlbefTrainingOptions(mlm=args.mlm, queue_size=args.queue_size)
    )
    state = model.state_dict()
    copied, fresh = 0, []
    for key, value in state.items():
        for src in source_key(key):
            if src in shipped and shipped[src].shape == value.shape:
                state[key] = shipped[src].clone()
                copied += 1
                break
        else:
            fresh.append(key)
    log.info("copied %d tensors; fresh: %s", copied, [k for k in fresh if not k.endswith("_queue")])
    if args.fit_stem is not None:
        model.load_state_dict(state)
        fit_stem(model, shipped, args.fit_stem, args.fit_steps)
        state = model.state_dict()
    torch.save({"model": state, "step": 0}, args.out)


if __name__ == "__main__":
    main()
