"""A toy problem for the training tests: a coloured block on the left or right of a noisy 32x32 image,
captioned "a X block on the left|right", and a tiny ALBEF over its 16-word vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alignfuse.models.albef.config import ALBEF_CONFIGS, AlbefConfig
from alignfuse.training import AlbefArch, PairData, TrainOptions
from alignfuse.training.objectives_albef import AlbefForTraining, AlbefTrainingOptions

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 190),
    "cyan": (30, 215, 225),
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "on", "the", "left", "right", "block", *COLOURS]


def tiny_config(vocab: Path) -> AlbefConfig:
    return ALBEF_CONFIGS["tiny"].replace(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        fusion_layer=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_width=32,
        vision_width=32,
        vision_depth=1,
        vision_heads=2,
        image_res=32,
        patch_size=16,
        embed_dim=16,
        max_position_embeddings=16,
        max_text_len=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab=str(vocab),
    )


def toy_data(n: int, seed: int) -> PairData:
    """A coloured block on a noisy background, captioned 'a X block on the left|right'. A perturbed caption
    names another colour or the other side."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    imgs, caps, truth = [], [], []
    for _ in range(n):
        c = names[int(rng.integers(0, len(names)))]
        side = "left" if rng.random() < 0.5 else "right"
        img = rng.integers(90, 160, size=(32, 32, 3)).astype(np.uint8)
        x0 = 2 if side == "left" else 18
        img[8:24, x0 : x0 + 12] = COLOURS[c]
        imgs.append(torch.from_numpy(img).permute(2, 0, 1))
        caps.append(f"a {c} block on the {side}")
        truth.append((c, side))

    def matches(caption: str, image: int) -> bool:
        w = caption.split()
        return (w[1], w[5]) == truth[image]

    def perturb(caption: str, image: int, r: np.random.Generator) -> str:
        w = caption.split()
        if r.random() < 0.3:
            w[5] = "right" if w[5] == "left" else "left"
        else:
            w[1] = [c for c in names if c != w[1]][int(r.integers(0, len(names) - 1))]
        return " ".join(w)

    return PairData(torch.stack(imgs), caps, list(range(n)), perturb=perturb, matches=matches)


def make_arch(vocab: Path, opts: TrainOptions, mlm: bool = True, **objectives: float) -> AlbefArch:
    """A tiny ALBEF adapter; ``objectives``: further :class:`AlbefTrainingOptions` (weights, ``bow_weight``)."""
    from alignfuse.models.text import AlbefTokenizer

    torch.manual_seed(opts.seed)
    cfg = tiny_config(vocab)
    tok = AlbefTokenizer(str(vocab), max_len=cfg.max_text_len)
    topts = AlbefTrainingOptions(
        queue_size=64,
        momentum=0.9,
        itm_balance=True,
        mlm=mlm,
        special_ids=(tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id),
        **objectives,  # type: ignore[arg-type]
    )
    return AlbefArch(AlbefForTraining(cfg, topts), tok, opts, torch.device("cpu"))
