"""read_karpathy: the one reader of Karpathy-style JSON (both layouts, merging, split filter, bad records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignfuse.data.karpathy import KarpathyImage, iter_karpathy, read_karpathy
from alignfuse.errors import CorruptDataError, NotFoundError


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_albef_layout_merges_repeated_images_in_order(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "train.json",
        [
            {"image": "a.jpg", "caption": "one", "image_id": 7},
            {"image": "b.jpg", "caption": ["two", "three"]},
            {"image": "a.jpg", "caption": "four", "image_id": 8, "source": "x"},
            {"image": "c.jpg", "captions": ["five", " "]},
            {"image": "d.jpg"},
        ],
    )
    got = read_karpathy(f)
    assert [g.image for g in got] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert got[0].captions == ("one", "four") and got[1].captions == ("two", "three")
    # the first record's keys win, later records only add keys
    assert got[0].extra == {"image_id": 7, "source": "x"}
    assert got[2].captions == ("five", " ")  # as written: dropping blanks is the caller's policy
    assert got[3].captions == () and got[3].group is None and got[3].objects is None
    # without merging, every record in file order
    assert [(where.rsplit("[", 1)[1], r.captions) for where, r in iter_karpathy(f)][:3] == [
        ("0]", ("one",)),
        ("1]", ("two", "three")),
        ("2]", ("four",)),
    ]


def test_scenes_fields_group_and_objects(tmp_path: Path) -> None:
    obj = {"shape": "circle", "colour": "red", "size": "small", "x": 0.3, "y": 0.4, "r": 0.1}
    f = _write(
        tmp_path / "scenes.json",
        [
            {"image": "images/1.png", "caption": ["a red circle"], "group": 3, "objects": [obj]},
            {"image": "images/2.png", "caption": ["x"], "group": "g", "objects": ["not a dict"]},
        ],
    )
    a, b = read_karpathy(f)
    assert a == KarpathyImage("images/1.png", ("a red circle",), 3, (obj,), {"group": 3, "objects": [obj]})
    assert b.group is None and b.objects is None  # not in the expected form: no typed value
    assert b.extra == {"group": "g", "objects": ["not a dict"]}


def test_original_layout_is_filtered_to_the_split(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                {"filepath": "val2014", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
                {
                    "filepath": "val2014",
                    "filename": "b.jpg",
                    "split": "test",
                    "cocoid": 42,
                    "sentences": [{"raw": "y", "tokens": ["ignored"]}, {"tokens": ["a", "dog"]}],
                },
                {"filepath": "", "filename": "c.jpg", "split": "val", "sentences": []},
            ],
        },
    )
    (b,) = read_karpathy(f)
    assert b.image == "val2014/b.jpg" and b.captions == ("y", "a dog")
    assert b.extra == {"split": "test", "cocoid": 42}
    assert [e.image for e in read_karpathy(f, split="train")] == ["val2014/a.jpg"]
    assert [e.image for e in read_karpathy(f, split="val")] == ["c.jpg"]
    assert read_karpathy(f, split="restval") == []


def test_bad_records_go_to_on_problem_and_are_skipped(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "bad.json",
        [
            {"image": "ok.jpg", "caption": "fine"},
            "garbage",
            {"caption": "no image"},
            {"image": "  ", "caption": "blank image"},
            {"image": "c.jpg", "caption": 5},
            {"image": "d.jpg", "caption": ["x", 1]},
        ],
    )
    problems: list[tuple[str, str]] = []
    got = read_karpathy(f, on_problem=lambda where, what: problems.append((where, what)))
    assert [g.image for g in got] == ["ok.jpg"]
    assert [w for w, _ in problems] == [f"{f}[{n}]" for n in (1, 2, 3, 4, 5)]
    reasons = [r for _, r in problems]
    assert reasons[0] == "not a JSON object"
    assert reasons[1] == reasons[2] == "missing 'image' field"
    assert reasons[3] == reasons[4] == "'caption' must be a string or a list of strings"
    # without on_problem the first bad record raises, naming where
    with pytest.raises(CorruptDataError, match=r"bad\.json\[1\]: not a JSON object"):
        read_karpathy(f)


def test_bad_records_of_the_original_layout(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "dataset.json",
        {
            "images": [
                7,
                {"filepath": "p", "split": "test", "sentences": [{"raw": "no filename"}]},
                {"filename": "a.jpg", "split": "test", "sentences": [{"tokens": [1]}]},
                {"filename": "b.jpg", "split": "test", "sentences": "nope"},
                {"filename": "z.jpg", "split": "train", "sentences": "not checked: another split"},
                {"filename": "ok.jpg", "split": "test", "sentences": [{"raw": "fine"}]},
            ]
        },
    )
    problems: list[tuple[str, str]] = []
    got = read_karpathy(f, on_problem=lambda where, what: problems.append((where, what)))
    assert [g.image for g in got] == ["ok.jpg"]
    assert [w.rsplit(":", 1)[1] for w, _ in problems] == ["images[0]", "images[1]", "images[2]", "images[3]"]
    with pytest.raises(CorruptDataError, match="images\\[0\\]"):
        read_karpathy(f)


def test_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        read_karpathy(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(CorruptDataError, match="not valid JSON"):
        read_karpathy(tmp_path / "broken.json")
    for layout in ({"image": "x"}, {"images": "not a list"}, 3):
        with pytest.raises(CorruptDataError, match="JSON list of records"):
            read_karpathy(_write(tmp_path / "other.json", layout), on_problem=lambda w, m: None)
    (tmp_path / "latin1.json").write_bytes(b'[{"image": "\xe9"}]')
    with pytest.raises(CorruptDataError, match="cannot read"):
        read_karpathy(tmp_path / "latin1.json")
