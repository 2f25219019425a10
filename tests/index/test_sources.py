"""Data sources: image folders, caption files (JSONL/CSV), Karpathy JSON, plain texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.index.sources import (
    CaptionFileSource,
    ImageFolderSource,
    KarpathySource,
    TextSource,
    open_source,
    text_sha256,
)

from .conftest import draw_image


def test_image_folder_is_recursive_case_insensitive_and_sorted(tmp_path: Path) -> None:
    for rel in ("b.JPG", "a/z.png", "a/b/c.JpEg", "c.webp", "notes.txt", "a/readme.md"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like an image is not an image
    src = ImageFolderSource(tmp_path)
    items = list(src.items())
    assert [i.metadata["relpath"] for i in items] == ["a/b/c.JpEg", "a/z.png", "b.JPG", "c.webp"]
    assert all(
        i.kind == "image" and i.path is not None and i.uri == i.path.resolve().as_posix() for i in items
    )
    flat = ImageFolderSource(tmp_path, recursive=False, extensions=["jpg"])
    assert [i.metadata["relpath"] for i in flat.items()] == ["b.JPG"]
    with pytest.raises(NotFoundError, match="--images"):
        ImageFolderSource(tmp_path / "missing")


def test_jsonl_captions_group_by_image_and_link_texts(tmp_path: Path) -> None:
    draw_image(tmp_path / "imgs" / "a.jpg", 1)
    lines = [
        {"image": "imgs/a.jpg", "caption": "a red circle", "split": "test"},
        {"image": "imgs/b.png", "caption": ["two", "three"]},
        {"image": "imgs/a.jpg", "caption": "a circle, red"},
        {"caption": "no image"},
        {"image": "imgs/c.png", "caption": 5},
    ]
    f = tmp_path / "caps.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n\n")
    src = CaptionFileSource(f)
    items = list(src.items())
    kinds = [i.kind for i in items]
    assert kinds == ["image", "text", "text", "image", "text", "text"]
    img_a = items[0]
    assert img_a.path == tmp_path / "imgs" / "a.jpg"
    assert img_a.text == "a red circle"
    assert img_a.metadata["captions"] == ["a red circle", "a circle, red"]
    assert img_a.metadata["split"] == "test"
    t = items[2]
    assert (
        t.text == "a circle, red"
        and t.metadata["image_uri"] == img_a.uri
        and t.metadata["caption_index"] == 1
    )
    assert t.sha256 == text_sha256("a circle, red", img_a.uri)
    assert t.uri == f"{img_a.uri}#caption1"
    reasons = [r for _, r in src.problems]
    assert len(reasons) == 3 and any("image" in r for r in reasons) and any("JSON" in r for r in reasons)


def test_csv_captions_extra_columns_and_image_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    f = tmp_path / "caps.csv"
    f.write_text('image,caption,photographer\nx.jpg,"a dog, running",ann\ny.jpg,a cat,bob\n')
    items = list(CaptionFileSource(f, image_root=tmp_path / "root").items())
    assert [i.kind for i in items] == ["image", "text", "image", "text"]
    assert items[0].path == tmp_path / "root" / "x.jpg"
    assert items[0].metadata["photographer"] == "ann" and items[1].text == "a dog, running"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\nx.jpg,hi\n")
    with pytest.raises(InvalidInputError, match="'image' and 'caption'"):
        list(CaptionFileSource(bad).items())
    (tmp_path / "caps.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="unsupported"):
        CaptionFileSource(tmp_path / "caps.txt")
    with pytest.raises(NotFoundError, match="--captions"):
        CaptionFileSource(tmp_path / "none.jsonl")


def test_karpathy_json(tmp_path: Path) -> None:
    data = [
        {"image": "val2014/COCO_1.jpg", "caption": ["one", "uno", "eins"], "image_id": 1},
        {"image": "val2014/COCO_2.jpg", "caption": "two", "image_id": 2},
        "garbage",
    ]
    f = tmp_path / "coco_test.json"
    f.write_text(json.dumps(data))
    (tmp_path / "coco").mkdir()
    src = KarpathySource(f, image_root=tmp_path / "coco")
    items = list(src.items())
    assert [i.kind for i in items] == ["image", "text", "text", "text", "image", "text"]
    assert items[0].path == tmp_path / "coco" / "val2014" / "COCO_1.jpg"
    assert items[0].metadata["image"] == "val2014/COCO_1.jpg" and items[0].metadata["image_id"] == 1
    assert items[3].text == "eins" and items[3].metadata["image_uri"] == items[0].uri
    assert src.problems and "not a JSON object" in src.problems[0][1]
    f.write_text('{"image": "x"}')
    with pytest.raises(InvalidInputError, match="list"):
        list(KarpathySource(f).items())
    with pytest.raises(NotFoundError, match="--image-root"):
        KarpathySource(f, image_root=tmp_path / "nowhere")


def test_karpathy_source_reads_through_the_shared_reader(tmp_path: Path) -> None:
    """Bad records are problems (never fatal); repeated images merge by path with repeated captions dropped;
    Karpathy's original dataset_*.json is read too (its ``split`` images, default test)."""
    data = [
        {"image": "a.jpg", "caption": "one"},
        {"image": "./a.jpg", "caption": ["one", "two", " "]},
        {"image": "b.jpg", "caption": 5},
        {"caption": "no image"},
    ]
    f = tmp_path / "train.json"
    f.write_text(json.dumps(data))
    src = KarpathySource(f)
    items = list(src.items())
    assert [(i.kind, i.text) for i in items] == [("image", "one"), ("text", "one"), ("text", "two")]
    assert src.problems == [
        (f"{f}[2]", "'caption' must be a string or a list of strings"),
        (f"{f}[3]", "missing 'image' field"),
    ]
    original = {
        "images": [
            {
                "filepath": "val",
                "filename": "x.jpg",
                "split": "test",
                "cocoid": 9,
                "sentences": [{"raw": "r"}],
            },
            {"filepath": "val", "filename": "y.jpg", "split": "train", "sentences": [{"raw": "s"}]},
        ]
    }
    f.write_text(json.dumps(original))
    items = list(KarpathySource(f).items())
    assert [i.text for i in items] == ["r", "r"] and items[0].path == tmp_path / "val" / "x.jpg"
    assert items[0].metadata["cocoid"] == 9
    assert [i.text for i in KarpathySource(f, split="train").items()] == ["s", "s"]
    f.write_text("[{")
    with pytest.raises(InvalidInputError, match="--karpathy: .*not valid JSON"):
        list(KarpathySource(f).items())


def test_text_source(tmp_path: Path) -> None:
    items = list(TextSource(["a cat", " ", "a dog"]).items())
    assert [(i.kind, i.text) for i in items] == [("text", "a cat"), ("text", "a dog")]
    assert items[0].sha256 == text_sha256("a cat")
    f = tmp_path / "t.txt"
    f.write_text("first\n\nsecond\n")
    assert [i.uri.rsplit("#", 1)[1] for i in TextSource(f).items()] == ["L1", "L3"]


def test_open_source_needs_exactly_one(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="exactly one"):
        open_source()
    with pytest.raises(InvalidInputError, match="exactly one"):
        open_source(images=tmp_path, captions=tmp_path / "c.jsonl")
    with pytest.raises(InvalidInputError, match="--image-root"):
        open_source(images=tmp_path, image_root=tmp_path)
    assert isinstance(open_source(images=tmp_path), ImageFolderSource)
