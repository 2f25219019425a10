"""Evaluation data: the split as ALBEF flattens it (read through read_karpathy), and the truth function."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from alignfuse.errors import CorruptDataError, InvalidInputError, NotFoundError
from alignfuse.evaluation import load_eval_data


def test_load_eval_data_layouts(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    # ALBEF train-style: one caption string per record, repeated image -> merged in order
    (tmp_path / "split.json").write_text(
        json.dumps(
            [
                {"image": "a.jpg", "caption": "one"},
                {"image": "b.jpg", "caption": ["two", "three"]},
                {"image": "a.jpg", "caption": "four"},
            ]
        )
    )
    d = load_eval_data(tmp_path / "split.json")
    assert d.images == ("a.jpg", "b.jpg") and d.texts == ("one", "four", "two", "three")
    assert d.txt2img == (0, 0, 1, 1) and d.img2txt == ((0, 1), (2, 3)) and d.groups is None
    assert d.image_paths[0] == tmp_path / "a.jpg"
    assert load_eval_data(tmp_path / "split.json", limit=1).texts == ("one", "four")
    # Karpathy's original dataset_*.json, filtered to the test split
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "images": [
                    {"filepath": "", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
                    {
                        "filepath": "",
                        "filename": "b.jpg",
                        "split": "test",
                        "sentences": [{"raw": "y"}, {"raw": "z"}],
                    },
                ]
            }
        )
    )
    d2 = load_eval_data(tmp_path / "dataset.json")
    assert d2.images == ("b.jpg",) and d2.texts == ("y", "z")
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(CorruptDataError):
        load_eval_data(tmp_path / "bad.json")
    with pytest.raises(NotFoundError):
        load_eval_data(tmp_path / "missing.json")
    with pytest.raises(InvalidInputError, match="limit"):
        load_eval_data(tmp_path / "split.json", limit=0)


def test_bad_record_is_fatal_for_evaluation(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"caption": "y"}]))
    with pytest.raises(CorruptDataError, match=r"\[1\]: missing 'image'"):
        load_eval_data(tmp_path / "split.json")


def test_pair_truth_lifts_the_callers_truth_function(tmp_path: Path) -> None:
    objs = [[{"colour": "red"}], [{"colour": "blue"}], [{"colour": "red"}, {"colour": "blue"}]]
    entries = [
        {"image": f"{n}.png", "caption": [f"{o[0]['colour']} {n}"], "group": 0, "objects": o}
        for n, o in enumerate(objs)
    ]
    (tmp_path / "s.json").write_text(json.dumps(entries))
    data = load_eval_data(tmp_path / "s.json")
    calls: list[tuple[str, int]] = []

    def says_colour(caption: str, objects: Sequence[dict[str, Any]]) -> bool:
        calls.append((caption, len(objects)))
        return any(o["colour"] == caption.split()[0] for o in objects)

    assert data.pair_truth(None) is None
    truth = data.pair_truth(says_colour)
    assert truth is not None
    # text 0 "red 0": true of image 0 (its own: not asked), of image 2 (red drawn), not of image 1
    assert [truth(0, i) for i in range(3)] == [True, False, True]
    assert [truth(1, i) for i in range(3)] == [False, True, True]
    assert calls == [("red 0", 1), ("red 0", 2), ("blue 1", 1), ("blue 1", 2)]
    truth(0, 2)
    assert len(calls) == 4  # memoised
    # without drawn objects for every image there is nothing to judge by
    entries[1].pop("objects")
    (tmp_path / "s.json").write_text(json.dumps(entries))
    assert load_eval_data(tmp_path / "s.json").pair_truth(says_colour) is None
