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
