"""The scenes generator and the training negatives stay byte-identical for existing seeds (issue 17 added probe
queries, a presence test and a memoised parser to the scenes package: additive only).

The digests were taken from the generator before those additions (this venv's pinned Pillow: PNG bytes depend
on its zlib; a Pillow upgrade that changes them is a reason to re-check, not to re-pin blindly)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from alignfuse.data.scenes import (
    attribute_caption,
    caption_scene,
    generate_scenes,
    parse_caption,
    perturb_caption,
    sample_scenes,
)

GOLDEN = {
    "train": "8d917218d1ef01c2d1711f955b985d935b957b041c1d7bea98a5210bc7983c52",
    "test": "abf3f413dc908efca36eb9f04085c51df19b3399cba2c190aaa9ce4c052b77d5",
    "compositional": "713e6300a9436385612fc8aec56e62e1922e541ef2cbe180b977eff85868c4b1",
    "negatives": "2b5804c2a9993e797ad29aa653d75b0ad7df2125f7b2e15201ddffe9d955ab53",
}


def test_generated_files_are_byte_identical(tmp_path: Path) -> None:
    for split, seed in (("train", 0), ("test", 3), ("compositional", 4)):
        root = generate_scenes(tmp_path / split, seed=seed, count=24, split=split, size=48).parent
        m = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                m.update(p.relative_to(root).as_posix().encode())
                m.update(p.read_bytes())
        assert m.hexdigest() == GOLDEN[split], split


def test_captions_negatives_and_parses_are_unchanged() -> None:
    rng = np.random.default_rng(7)
    m = hashlib.sha256()
    for s in sample_scenes(11, 30, "train"):
        for c in caption_scene(s, rng):
            m.update(repr((c, perturb_caption(c, s.objects, rng), parse_caption(c))).encode())
        pair = (attribute_caption(s.objects, rng, true=True), attribute_caption(s.objects, rng, true=False))
        m.update(repr(pair).encode())
    assert m.hexdigest() == GOLDEN["negatives"]
