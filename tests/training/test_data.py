"""Reading training pairs: one image per distinct file, captions merged, bad records and blank captions
skipped, groups and scene functions only when every image has them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignfuse.errors import NotFoundError
from alignfuse.training import load_pairs


def _write(tmp_path: Path, records: object) -> Path:
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((10, 10, 3), 200, dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def test_repeated_images_merge_and_bad_records_are_skipped(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {"image": "a.png", "caption": "a one", "group": 3},
            {"image": "b.png", "caption": ["b one", "  "], "group": 4},
            "not a record",
            {"image": "a.png", "caption": "a two"},
            {"image": "missing.png", "caption": "gone"},
        ],
    )
    data = load_pairs(path, None, 8)
    assert data.images.shape == (2, 3, 8, 8)  # resized; the unreadable image is skipped
    assert data.captions == ["a one", "a two", "b one"] and data.image_of == [0, 0, 1]
    assert data.groups == [3, 4] and data.matches is None  # no objects: no scene functions
    assert load_pairs(path, None, 8, limit=1).captions == ["a one", "a two"]


def test_groups_need_every_image(tmp_path: Path) -> None:
    path = _write(
        tmp_path, [{"image": "a.png", "caption": "x", "group": 1}, {"image": "b.png", "caption": "y"}]
    )
    assert load_pairs(path, None, 8).groups is None


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_pairs(tmp_path / "nope.json", None, 8)


def test_colour_mates_share_colours_and_differ_in_shapes() -> None:
    from alignfuse.data.scenes import sample_scenes
    from alignfuse.training.data import colour_mates

    scenes = sample_scenes(seed=11, count=300, split="train")
    objs = [list(s.objects) for s in scenes]
    mates = colour_mates(objs)
    assert sum(1 for m in mates if m) > 100  # most images have some
    for i, m in enumerate(mates):
        for j in m:
            assert {o.colour for o in objs[j]} == {o.colour for o in objs[i]}
            assert {o.shape for o in objs[j]} != {o.shape for o in objs[i]}
        # and nothing with the same colours and other shapes is missing
        want = [
            j
            for j in range(len(objs))
            if {o.colour for o in objs[j]} == {o.colour for o in objs[i]}
            and {o.shape for o in objs[j]} != {o.shape for o in objs[i]}
        ]
        assert sorted(m) == want


def test_mate_mix_fills_its_share_of_each_batch_with_colour_mates() -> None:
    import torch

    from alignfuse.training.data import PairData, epoch_batches
    from alignfuse.training.options import TrainOptions

    n = 64
    # images 2k and 2k+1 are mates of each other; nothing else is
    mates = [[i ^ 1] for i in range(n)]
    data = PairData(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), [f"c{i}" for i in range(n)], list(range(n)))
    data.mates = mates
    plain = epoch_batches(data, TrainOptions(batch_size=16), 0)
    assert sum(len(b) for b in plain) == n  # one pass over the images, no extras
    mixed = epoch_batches(data, TrainOptions(batch_size=16, mate_mix=0.25), 0)
    fresh_all = []
    for batch in mixed:
        assert len(batch) == 16 or batch is mixed[-1]  # the last batch holds the remaining 4 fresh + 4 mates
        fresh = batch[: 12 if len(batch) == 16 else len(batch) // 2]
        fresh_all += fresh
        assert all(
            e ^ 1 in fresh for e in batch[len(fresh) :]
        )  # each extra is a mate of a fresh image of its batch
    assert sorted(fresh_all) == list(range(n))  # every image once as a fresh one
    with pytest.raises(Exception, match="mate_mix"):
        TrainOptions(group_mix=0.6, mate_mix=0.5)
