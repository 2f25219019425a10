"""Hostile input through the CLI (defects A-G and K of issue 12): bad records and bad files are reported and
skipped, the rest is indexed; paths stay inside their root; exit codes say what happened."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.index import Collection
from alignfuse.index.collection import CollectionWriter
from alignfuse.models.base import DualEncoder

from .conftest import draw_image, make_image_folder
from .hostile import exif_rotated_jpeg, make_hostile_captions, make_hostile_images
from .test_cli_collections import BUILD, run

EXIT_ITEMS_FAILED = 6


def _report(out: str, err: str) -> str:
    return " ".join((out + " " + err).split())


# -- A: a non-UTF-8 record; a failed first build ------------------------------------------------------
def test_non_utf8_caption_line_is_reported_and_the_rest_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    draw_image(tmp_path / "x.png", 1)
    draw_image(tmp_path / "y.png", 2)
    caps = tmp_path / "c.jsonl"
    caps.write_bytes(b'{"image":"x.png","caption":"ok"}\n{"image":"y.png","caption":"\xff"}\n')
    coll = tmp_path / "cA"
    code, out, err = run(monkeypatch, capsys, "build", str(coll), "--captions", str(caps), *BUILD)
    assert code == EXIT_ITEMS_FAILED, err
    assert "Traceback" not in err
    text = _report(out, err)
    assert f"{caps}:2" in text and "UTF-8" in text
    with Collection.open(coll) as c:
        assert (c.count("image"), c.count("text")) == (1, 1)
        assert Path(c.list(kind="image")[0].uri).name == "x.png"


def test_csv_caption_file_with_a_bad_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    draw_image(tmp_path / "x.png", 1)
    draw_image(tmp_path / "y.png", 2)
    caps = tmp_path / "c.csv"
    caps.write_bytes(b"\xef\xbb\xbfimage,caption\nx.png,fine\ny.png,caf\xe9\n")  # a BOM, then Latin-1
    code, out, err = run(
        monkeypatch, capsys, "build", str(tmp_path / "c"), "--captions", str(caps), *BUILD, "--allow-failures"
    )
    assert code == 0, err
    assert f"{caps}:3" in _report(out, err) and "UTF-8" in _report(out, err)
    with Collection.open(tmp_path / "c") as c:
        assert c.count("image") == 1


def test_a_failed_first_build_leaves_no_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    caps = tmp_path / "c.csv"
    caps.write_text("picture,text\nx.png,hello\n")
    coll = tmp_path / "c"
    code, _, err = run(monkeypatch, capsys, "build", str(coll), "--captions", str(caps), *BUILD)
    assert code == 2 and "'image' and 'caption' columns" in err
    assert not coll.exists()

    # an error in the middle of the first build (the encoder fails): nothing is left behind
    images = tmp_path / "images"
    make_image_folder(images, 6)
    from alignfuse.models import registry

    real = registry.create_dual_encoder

    def failing(*a: object, **k: object) -> DualEncoder:
        enc = real(*a, **k)  # type: ignore[arg-type]

        def boom(pixels: torch.Tensor) -> np.ndarray:
            raise RuntimeError("the device fell over")

        enc.encode_images = boom  # type: ignore[method-assign]
        return enc

    monkeypatch.setattr(registry, "create_dual_encoder", failing)
    with pytest.raises(RuntimeError, match="fell over"):
        run(monkeypatch, capsys, "build", str(coll), "--images", str(images), *BUILD)
    assert not coll.exists()
    # ... but a collection that existed before is never removed, even if this run committed nothing
    monkeypatch.setattr(registry, "create_dual_encoder", real)
    assert run(monkeypatch, capsys, "build", str(coll), "--images", str(images), *BUILD)[0] == 0
    make_image_folder(images, 2, start=6)
    monkeypatch.setattr(registry, "create_dual_encoder", failing)
    with pytest.raises(RuntimeError, match="fell over"):
        run(monkeypatch, capsys, "add", str(coll), "--images", str(images), "--workers", "0", "--no-progress")
    with Collection.open(coll) as c:
        assert c.count("image") == 6


# -- B: captions of images that failed ----------------------------------------------------------------
def test_captions_of_failed_images_are_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from .hostile import png_bomb

    draw_image(tmp_path / "ok.png", 1)
    (tmp_path / "notimage.png").write_bytes(b"just text")
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    recs = [
        {"image": "ok.png", "caption": "fine"},
        {"image": "missing.png", "caption": ["lost one", "lost two"]},
        {"image": "notimage.png", "caption": "not a picture"},
        {"image": "bomb.png", "caption": "boom"},
    ]
    caps = tmp_path / "c.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in recs))
    coll = tmp_path / "c"
    code, out, err = run(monkeypatch, capsys, "build", str(coll), "--captions", str(caps), *BUILD)
    assert code == EXIT_ITEMS_FAILED, err
    text = _report(out, err)
    assert "3 failed" in text  # one line per failed image; its captions go with it
    for name in ("missing.png", "notimage.png", "bomb.png"):
        assert name in text
    assert "with 2 captions" in text
    with Collection.open(coll) as c:
        assert c.count("text") == 1 and c.count("image") == 1
        texts = [i.text for i in c.list(kind="text")]
        assert texts == ["fine"]


# -- C: one decoder (EXIF orientation) -----------------------------------------------------------------
def test_builder_and_api_decode_an_exif_rotated_jpeg_the_same_way(
    tmp_path: Path,
    tiny_encoder: DualEncoder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from alignfuse.service.images import open_image

    path = exif_rotated_jpeg(tmp_path / "imgs" / "rotated.jpg")
    coll = tmp_path / "c"
    code, _, err = run(monkeypatch, capsys, "build", str(coll), "--images", str(tmp_path / "imgs"), *BUILD)
    assert code == 0, err
    upright = open_image(path.read_bytes(), max_bytes=1 << 20, max_pixels=1 << 20)
    assert upright.size == (64, 48)  # the API applies the orientation
    pixels = tiny_encoder.image_transform(upright).unsqueeze(0)
    with torch.inference_mode():
        want = tiny_encoder.encode_images(pixels)[0]
    sideways = tiny_encoder.image_transform(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        wrong = tiny_encoder.encode_images(sideways)[0]
    assert not np.allclose(want, wrong, atol=1e-3)  # the orientation matters to the encoder
    with Collection.open(coll) as c:
        _, got = c.vectors("image")
    np.testing.assert_allclose(got[0], want, atol=1e-5)


# -- D: confinement ------------------------------------------------------------------------------------
def test_caption_paths_are_confined_to_the_image_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    draw_image(root / "in.png", 1)
    secret = draw_image(tmp_path / "private" / "secret.png", 2)
    (root / "link.png").symlink_to(secret)
    climb = "../" * 12 + secret.resolve().as_posix().lstrip("/")
    recs = [
        {"image": "in.png", "caption": "inside"},
        {"image": climb, "caption": "climbing out"},
        {"image": secret.resolve().as_posix(), "caption": "absolute"},
        {"image": "link.png", "caption": "symlink out"},
    ]
    caps = root / "c.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in recs))
    coll = tmp_path / "c"
    code, out, err = run(monkeypatch, capsys, "build", str(coll), "--captions", str(caps), *BUILD)
    assert code == EXIT_ITEMS_FAILED, err
    text = _report(out, err)
    for written in (climb, secret.resolve().as_posix(), "link.png"):
        assert written in text  # named as the user wrote it
    assert "--allow-outside-root" in text
    with Collection.open(coll) as c:
        assert [Path(i.uri).name for i in c.list(kind="image")] == ["in.png"]
        assert c.count("text") == 1
    # the explicit flag lets them in (the three name the same file: one image, three captions)
    coll2 = tmp_path / "c2"
    code, out, err = run(
        monkeypatch, capsys, "build", str(coll2), "--captions", str(caps), *BUILD, "--allow-outside-root"
    )
    assert code == 0, err
    with Collection.open(coll2) as c:
        assert sorted(Path(i.uri).name for i in c.list(kind="image")) == ["in.png", "secret.png"]
        assert c.count("text") == 4


def test_image_folder_refuses_symlinks_out_of_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    draw_image(images / "a.png", 1)
    draw_image(images / "sub" / "b.png", 2)
    secret = draw_image(tmp_path / "private" / "secret.png", 3)
    (images / "escape.png").symlink_to(secret)
    (images / "inside.png").symlink_to(images / "sub" / "b.png")  # inside the tree: fine (a duplicate)
    (images / "outdir").symlink_to(tmp_path / "private", target_is_directory=True)
    code, out, err = run(monkeypatch, capsys, "build", str(tmp_path / "c"), "--images", str(images), *BUILD)
    assert code == EXIT_ITEMS_FAILED, err
    text = _report(out, err)
    assert f"{images}/escape.png" in text and "outside" in text
    assert f"{images}/outdir" in text
    with Collection.open(tmp_path / "c") as c:
        names = sorted(Path(i.uri).name for i in c.list(kind="image"))
    assert names == ["a.png", "b.png"] and "secret" not in " ".join(names)
    code, _, err = run(
        monkeypatch,
        capsys,
        "build",
        str(tmp_path / "c2"),
        "--images",
        str(images),
        *BUILD,
        "--allow-outside-root",
    )
    assert code == 0, err
    with Collection.open(tmp_path / "c2") as c:
        assert "secret.png" in {Path(i.uri).name for i in c.list(kind="image")}


# -- E: say what is wrong with a record ----------------------------------------------------------------
def test_record_problems_say_what_is_wrong(tmp_path: Path) -> None:
    from alignfuse.index.sources import CaptionFileSource

    draw_image(tmp_path / "a.png", 1)
    recs = [
        {"image": 42, "caption": "x"},
        {"image": "", "caption": "x"},
        {"caption": "x"},
        {"image": "a.png"},
        {"image": "a.png", "caption": 7},
        {"image": "a.png", "caption": "y" * 100_000},
    ]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    src = CaptionFileSource(f)
    list(src.items())
    got = dict(src.problems)
    assert got[f"{f}:1"] == "'image' must be a string (a file path), got int 42"
    assert got[f"{f}:2"] == "'image' is empty"
    assert got[f"{f}:3"] == "missing 'image' field"
    assert got[f"{f}:4"] == "missing 'caption' field"
    assert got[f"{f}:5"] == "'caption' must be a string or a list of strings, got int 7"
    assert "100000 characters" in got[f"{f}:6"]


# -- F: delete is idempotent ---------------------------------------------------------------------------
def test_delete_again_warns_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 4)
    coll = tmp_path / "c"
    assert run(monkeypatch, capsys, "build", str(coll), "--images", str(images), *BUILD)[0] == 0
    assert run(monkeypatch, capsys, "delete", str(coll), "1", "2")[0] == 0
    v = Collection.open(coll).version
    code, out, err = run(monkeypatch, capsys, "delete", str(coll), "1", "2")
    assert code == 0, err
    assert "already deleted" in _report(out, err) and "[1, 2]" in _report(out, err)
    assert Collection.open(coll).version == v  # nothing to commit
    code, out, err = run(monkeypatch, capsys, "delete", str(coll), "2", "3")
    assert code == 0 and "deleted 1" in out and "already deleted" in _report(out, err)
    with Collection.open(coll) as c:
        assert c.count("image") == 1
    code, _, err = run(monkeypatch, capsys, "delete", str(coll), "3", "999")
    assert code == 3 and "999" in err  # an id that never existed is still an error
    with Collection.open(coll) as c:
        assert c.count("image") == 1


# -- G: the lock is checked before the models load -----------------------------------------------------
@pytest.mark.parametrize("command", ["build", "add"])
def test_second_writer_fails_before_loading_models(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 3)
    coll = tmp_path / "c"
    assert run(monkeypatch, capsys, "build", str(coll), "--images", str(images), *BUILD)[0] == 0
    from alignfuse.models import registry

    loads: list[str] = []
    real = registry.create_dual_encoder
    monkeypatch.setattr(registry, "create_dual_encoder", lambda *a, **k: loads.append("x") or real(*a, **k))
    args = [command, str(coll), "--images", str(images), "--workers", "0", "--no-progress"]
    if command == "build":
        args += ["--model", "alignfuse:random-tiny"]
    with CollectionWriter(coll):
        code, _, err = run(monkeypatch, capsys, *args)
    assert code == 4, err
    assert f"pid {os.getpid()}" in err and "wait" in err
    assert loads == []


# -- K: failures give a distinct exit code -------------------------------------------------------------
def test_exit_code_when_items_failed_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 3)
    (images / "bad.png").write_bytes(b"nope")
    code, out, _ = run(monkeypatch, capsys, "build", str(tmp_path / "c"), "--images", str(images), *BUILD)
    assert code == EXIT_ITEMS_FAILED and "1 failed" in out and "bad.png" in out
    (images / "more.png").write_bytes(b"nope")
    code, out, _ = run(
        monkeypatch,
        capsys,
        "add",
        str(tmp_path / "c"),
        "--images",
        str(images),
        "--no-progress",
        "--workers",
        "0",
        "--allow-failures",
    )
    assert code == 0 and "2 failed" in out
    code, out, _ = run(monkeypatch, capsys, "build", "--help")
    assert "--allow-failures" in out and str(EXIT_ITEMS_FAILED) in out


# -- the hostile corpus --------------------------------------------------------------------------------
def test_hostile_image_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "corpus"
    entries = make_hostile_images(root, tmp_path / "outside")
    coll = tmp_path / "c"
    code, out, err = run(monkeypatch, capsys, "build", str(coll), "--images", str(root), *BUILD)
    assert code == EXIT_ITEMS_FAILED, err
    assert "Traceback" not in err
    text = out + err
    bad = [e for e in entries if not e.ok]
    good = [e for e in entries if e.ok]
    for e in bad:
        shown = os.fsencode(e.name).decode("utf-8", "backslashreplace")
        assert shown.split("\n")[0] in text, f"{e.why} ({e.name!r}) not reported"
    with Collection.open(coll) as c:
        items = c.list(kind="image", limit=1000)
        names = {i.metadata.get("relpath") for i in items}
        assert names == {e.name for e in good}, {e.name for e in good} ^ names
        ids, vecs = c.vectors("image")
        assert len(ids) == len(items) and np.isfinite(vecs).all()
        res = c.search(vecs, 1, "image")  # every indexed image finds itself
        np.testing.assert_array_equal(res.ids[:, 0], ids)
    # the decoder gave odd modes real content (a 16-bit PNG is not flattened to white)
    from alignfuse.index.images import decode_image

    deep = decode_image((root / "deep16.png").read_bytes(), max_pixels=1 << 20)
    arr = np.asarray(deep)
    assert deep.mode == "RGB" and arr.std() > 10 and arr.max() < 255


def test_hostile_captions_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    caps, n_good, must_report = make_hostile_captions(tmp_path / "set", tmp_path / "outside")
    coll = tmp_path / "c"
    code, out, err = run(monkeypatch, capsys, "build", str(coll), "--captions", str(caps), *BUILD)
    assert code == EXIT_ITEMS_FAILED, err
    assert "Traceback" not in err
    text = _report(out, err)
    for needle in must_report:
        assert needle in text, needle
    with Collection.open(coll) as c:
        images = c.list(kind="image")
        assert sorted(Path(i.uri).name for i in images) == [f"ok{i}.png" for i in range(n_good)]
        texts = c.list(kind="text", limit=100)
        assert sorted(t.text or "" for t in texts) == sorted(
            ["a good caption", "another one", "ok1 caption", "ok2 caption"]
        )
        by_id = {i.id for i in images}
        assert all(t.metadata["image_item_id"] in by_id for t in texts)  # every caption points at an image


def test_image_bytes_are_decoded_once_with_the_same_limits(tmp_path: Path) -> None:
    """service/images.open_image and the builder share index/images.decode_image."""
    from alignfuse.errors import ImageTooLargeError, UnsupportedMediaError
    from alignfuse.index.images import decode_image
    from alignfuse.service.images import open_image

    from .hostile import gif_bomb, jpeg_bomb, png_bomb, tiff_bomb, webp_bomb

    for bomb in (png_bomb(), jpeg_bomb(), gif_bomb(), webp_bomb(), tiff_bomb()):
        with pytest.raises(ImageTooLargeError):
            decode_image(bomb, max_pixels=64_000_000)
        with pytest.raises(ImageTooLargeError):
            open_image(bomb, max_bytes=1 << 20, max_pixels=64_000_000)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PPM")  # a real image, not an accepted format
    with pytest.raises(UnsupportedMediaError, match="PPM"):
        decode_image(buf.getvalue(), max_pixels=1 << 20)
