"""Why does the scenes model read colour but hardly shape? Three probes, each cheap (issue #17).

1. **Representation**: a linear probe (logistic regression, multi-label) on a frozen checkpoint's image tokens
   (CLS after the final norm, the token ITC embeds; and the mean of the patch tokens) predicts which shapes /
   which colours an image holds. If shapes are linearly absent from a model whose colours are present, the
   vision tower never learned them.
2. **Capacity / input**: the same ViT, trained from scratch *with supervision* (which shapes are present), for a
   fixed number of steps, next to the same ViT with a small convolutional stem in place of the linear patch
   embedding ("conv"), on a CNN backbone ("hybrid"), and a plain CNN with global max pooling ("cnn"). If the plain ViT learns shapes under direct supervision, its capacity and the 96 px input suffice,
   and the failure lies in what the contrastive objective and the data ask of it.
3. **Data**: in a random training batch, how many (image, other caption) pairs could be told apart by colour
   words alone, by shape words alone, and how many need shapes (same colours, different shapes)? That is how much
   of the ITC signal ever needs shapes.

    python docs/training/diagnose_shapes.py TRAIN_SCENES_JSON VAL_SCENES_JSON [--checkpoint X.safetensors]
        [--steps 400] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from alignfuse.data.scenes.world import COLOURS, SHAPES
from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.model import build_visual_encoder
from alignfuse.models.base import CLIP_MEAN, CLIP_STD

COLOUR_NAMES = tuple(COLOURS)


def load(path: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    entries = json.loads(path.read_text())[:limit]
    root = path.parent
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pix, shp, col = [], [], []
    for e in entries:
        arr = np.asarray(Image.open(root / e["image"]).convert("RGB"), dtype=np.float32) / 255.0
        pix.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
        s = torch.zeros(len(SHAPES))
        c = torch.zeros(len(COLOUR_NAMES))
        for o in e["objects"]:
            s[SHAPES.index(o["shape"])] = 1
            c[COLOUR_NAMES.index(o["colour"])] = 1
        shp.append(s)
        col.append(c)
    return torch.stack(pix), torch.stack(shp), torch.stack(col), entries


def exact_acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((logits > 0).float() == labels).all(dim=1).float().mean())


def label_acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((logits > 0).float() == labels).float().mean())


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor) -> dict:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], ytr.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(lin(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        out = lin(xva)
    return {"exact": exact_acc(out, yva), "per_label": label_acc(out, yva)}


def probe_checkpoint(ckpt: Path, cfg: AlbefConfig, data: dict) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(ckpt))
    vit = build_visual_encoder(cfg)
    vit.load_state_dict(
        {k[len("visual_encoder.") :]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    )
    vit.eval()

    def feats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            toks = torch.cat([vit.forward_features(x[i : i + 256]) for i in range(0, len(x), 256)])
        return toks[:, 0], toks[:, 1:].mean(1)

    tr_cls, tr_mean = feats(data["xtr"])
    va_cls, va_mean = feats(data["xva"])
    out = {}
    for name, a, b in (("cls", tr_cls, va_cls), ("patch_mean", tr_mean, va_mean)):
        out[name] = {
            "shapes": linear_probe(a, data["str"], b, data["sva"]),
            "colours": linear_probe(a, data["ctr"], b, data["cva"]),
        }
    return out


def _block(i: int, o: int, pool: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, 1, 1), torch.nn.GELU(), torch.nn.MaxPool2d(pool))


class HybridStem(torch.nn.Module):
    """A small CNN backbone (3×3 conv + max-pool blocks, pools 2·2·3 = the patch size) as the ViT's token embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            _block(3, 32, 2), _block(32, 64, 2), _block(64, 96, 3), torch.nn.Conv2d(96, width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PooledCNN(torch.nn.Module):
    """The reference: a plain CNN (4 conv + max-pool blocks, global max pool), no transformer at all."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            _block(3, 24, 2),
            _block(24, 48, 2),
            _block(48, 96, 2),
            _block(96, width, 2),
            torch.nn.AdaptiveMaxPool2d(1),
            torch.nn.Flatten(),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).unsqueeze(1)  # [n, 1, width]: "token 0" like the ViT's CLS


class MaxPooledViT(torch.nn.Module):
    """The ViT read by a max over its patch tokens instead of its CLS token (what a CNN's global max pool does)."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)[:, 1:].amax(1, keepdim=True)


def supervised(cfg: AlbefConfig, stem: str, data: dict, steps: int, seed: int) -> dict:
    """``stem``: "linear" / "conv" (the ViT with ``patch_stem``), "hybrid" (ViT on a CNN backbone), "cnn" (no ViT);
    a "-max" suffix reads the ViT by a max over its patch tokens instead of its CLS token."""
    torch.manual_seed(seed)
    vit: torch.nn.Module
    base, _, pool = stem.partition("-")
    if base == "cnn":
        vit = PooledCNN(cfg.vision_width)
    else:
        vit = build_visual_encoder(cfg.replace(patch_stem="linear" if base == "hybrid" else base))
        if base == "hybrid":
            vit.patch_embed.proj = HybridStem(cfg.vision_width)
        if pool == "max":
            vit = MaxPooledViT(vit)
    head = torch.nn.Linear(cfg.vision_width, len(SHAPES) + len(COLOUR_NAMES))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.02)
    y = torch.cat([data["str"], data["ctr"]], 1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    curve = []
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.binary_cross_entropy_with_logits(head(vit.forward_features(data["xtr"][idx])[:, 0]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 4) == 0:
            curve.append(_eval_sup(vit, head, data) | {"step": step + 1})
    secs = time.perf_counter() - t0
    return {"stem": stem, "steps": steps, "seconds": round(secs, 1), "curve": curve}


def _eval_sup(vit: torch.nn.Module, head: torch.nn.Module, data: dict) -> dict:
    with torch.no_grad():
        out = head(vit.forward_features(data["xva"])[:, 0])
    ns = len(SHAPES)
    return {
        "shapes_exact": exact_acc(out[:, :ns], data["sva"]),
        "shapes_per_label": label_acc(out[:, :ns], data["sva"]),
        "colours_exact": exact_acc(out[:, ns:], data["cva"]),
    }


def batch_statistics(
    entries: list[dict], rng: np.random.Generator, batches: int = 200, size: int = 32
) -> dict:
    """Over random batches: of the (image, other image's scene) pairs, how many differ in the colour set, in the
    shape set, and how many have the same colour set but a different shape set (only shapes tell them apart)."""
    cols = [frozenset(o["colour"] for o in e["objects"]) for e in entries]
    shps = [frozenset(o["shape"] for o in e["objects"]) for e in entries]
    bags = [frozenset((o["colour"], o["shape"]) for o in e["objects"]) for e in entries]
    n = pairs = by_colour = by_shape = shape_only = same_bag = 0
    for _ in range(batches):
        idx = rng.choice(len(entries), size=size, replace=False)
        for i in idx:
            for j in idx:
                if i == j:
                    continue
                pairs += 1
                by_colour += cols[i] != cols[j]
                by_shape += shps[i] != shps[j]
                shape_only += cols[i] == cols[j] and shps[i] != shps[j]
                same_bag += bags[i] == bags[j]
        n += 1
    return {
        "pairs": pairs,
        "colour_sets_differ": by_colour / pairs,
        "shape_sets_differ": by_shape / pairs,
        "only_shapes_differ": shape_only / pairs,
        "same_bag_of_pairs": same_bag / pairs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", type=Path)
    ap.add_argument("val", type=Path)
    ap.add_argument("--checkpoint", type=Path, action="append", default=[])
    ap.add_argument("--config", type=Path, default=Path("models/weights/scenes-albef.json"))
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument(
        "--stems",
        default="linear,conv,hybrid,cnn",
        help="supervised runs, comma-separated (linear-max, conv-max, hybrid-max: max over patch tokens)",
    )
    ap.add_argument("--no-linear-probe", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = AlbefConfig.from_json(args.config)
    xtr, s_tr, c_tr, e_tr = load(args.train, args.train_images)
    xva, s_va, c_va, _ = load(args.val, None)
    data = {"xtr": xtr, "str": s_tr, "ctr": c_tr, "xva": xva, "sva": s_va, "cva": c_va}
    result: dict = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "train_images": len(xtr),
        "val_images": len(xva),
        "chance_shapes_exact_majority": exact_acc(torch.full_like(s_va, -1), s_va),
        "batch_statistics": batch_statistics(e_tr, np.random.default_rng(0)),
    }
    print(json.dumps(result["batch_statistics"]), flush=True)
    if not args.no_linear_probe:
        result["linear_probe"] = {str(c): probe_checkpoint(c, cfg, data) for c in args.checkpoint}
    print(json.dumps(result.get("linear_probe")), flush=True)
    result["supervised"] = [supervised(cfg, stem, data, args.steps, 0) for stem in args.stems.split(",")]
    print(json.dumps(result["supervised"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
