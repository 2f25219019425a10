"""The collection CLI commands (in-process through ``alignfuse.service.cli.main``): happy path and exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alignfuse.index import Collection
from alignfuse.index.collection import CollectionWriter

from .conftest import make_image_folder


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    from alignfuse.service.cli import _common as cli_common
    from alignfuse.service.cli import main

    monkeypatch.setattr(cli_common.console, "width", 400)
    monkeypatch.setattr(sys, "argv", ["alignfuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), err.strip()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "images", 10)
    (tmp_path / "images" / "bad.png").write_bytes(b"")
    return tmp_path / "images"


BUILD = ("--model", "alignfuse:random-tiny", "--workers", "0", "--no-progress", "--batch-size", "4")


def test_build_info_search_delete_compact_add(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    coll = tmp_path / "c"
    code, out, _ = run(
        monkeypatch, capsys, "build", str(coll), "--images", str(images), *BUILD, "--commit-every", "4"
    )
    # a file failed: reported, and a distinct exit code (6) unless --allow-failures
    assert code == 6 and "added 10 (10 images, 0 texts)" in out and "1 failed" in out and "bad.png" in out
    code, out, _ = run(monkeypatch, capsys, "info", str(coll))
    assert code == 0 and "alignfuse:random-tiny" in out and "10 images" in out and "segments (1)" in out
    code, out, _ = run(monkeypatch, capsys, "search", str(coll), "--text", "a red square", "-k", "3")
    assert (
        code == 0
        and "top 3 image items" in out
        and out.count(".png") + out.count(".jp") + out.count(".JP") >= 3
    )
    code, out, _ = run(
        monkeypatch, capsys, "search", str(coll), "--image", str(images / "img0001.png"), "-k", "2"
    )
    assert code == 0 and "img0001.png" in out  # an image is its own nearest neighbour
    code, out, _ = run(monkeypatch, capsys, "delete", str(coll), "1", "2")
    assert code == 0 and "deleted 2" in out
    code, out, _ = run(monkeypatch, capsys, "compact", str(coll), "--index-key", "HNSW16")
    assert code == 0 and "-> 1" in out and "HNSW16" in out
    c = Collection.open(coll)
    assert c.count("image") == 8 and c.manifest.index_key == "HNSW16"
    assert c.manifest.segments[0].part("image").index_key == "HNSW16"  # type: ignore[union-attr]
    make_image_folder(images, 2, start=10)
    code, out, _ = run(
        monkeypatch,
        capsys,
        "add",
        str(coll),
        "--images",
        str(images),
        "--workers",
        "0",
        "--no-progress",
        "--allow-failures",
    )
    # 10 old files: 8 live ones are skipped, the 2 deleted ones are indexed again (new ids), + 2 new files
    assert code == 0 and "added 4" in out and "skipped 8" in out
    code, out, _ = run(monkeypatch, capsys, "info", str(coll), "--json")
    assert code == 0 and '"key": "HNSW16"' in out


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("build", "{c}", *BUILD), 2, "exactly one of --images"),
        (("build", "{c}", "--images", "{t}/missing", *BUILD), 3, "--images: folder not found"),
        (("build", "{c}", "--images", "{i}", *BUILD, "--index-key", "Bogus"), 2, "--index-key"),
        (
            ("build", "{c}", "--images", "{i}", "--model", "alignfuse:random-tiny", "--batch-size", "0"),
            2,
            "--batch-size",
        ),
        (("build", "{c}", "--images", "{i}", *BUILD, "--rerank-cache"), 2, "--reranker"),
        (("build", "{c}", "--images", "{i}", "--model", "nofamily"), 2, "nofamily"),
        (("build", "{c}", "--images", "{i}", *BUILD, "--device", "tpu"), 2, "--device"),
        (("build", "{c}", "--images", "{i}", *BUILD, "--runtime", "tensorrt"), 2, "--runtime"),
        (("build", "{c}", "--images", "{i}", *BUILD, "--engine", "ray", "--runtime", "onnx"), 2, "--runtime"),
        (("build", "{c}", "--captions", "{t}/caps.jsonl", *BUILD), 3, "--captions"),
        (("add", "{t}/none", "--images", "{i}"), 3, "COLLECTION"),
        (("info", "{t}/none"), 3, "COLLECTION"),
        (("search", "{t}/none", "--text", "x"), 3, "COLLECTION"),
        (
            ("search", "{t}", "--text", "x", "--image", "{i}/img0001.png"),
            2,
            "exactly one of --text or --image",
        ),
        (("search", "{t}", "--image", "{t}/nope.png"), 3, "--image"),
        (("search", "{t}", "--text", "x", "-k", "0"), 2, "-k"),
        (("search", "{t}", "--text", "x", "--modality", "audio"), 2, "--modality"),
        (("search", "{t}", "--text", "x", "--target", "audio"), 2, "--target"),
        (("delete", "{t}/none", "1"), 3, "COLLECTION"),
        (("compact", "{t}/none"), 3, "COLLECTION"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(
    args: tuple[str, ...],
    code: int,
    needle: str,
    tmp_path: Path,
    images: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fmt = {"c": str(tmp_path / "c"), "t": str(tmp_path), "i": str(images)}
    got, _, err = run(monkeypatch, capsys, *(a.format(**fmt) for a in args))
    assert got == code, err
    assert needle in err
    assert len(err.splitlines()) == 1, err


def test_existing_collection_errors(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    coll = tmp_path / "c"
    assert (
        run(monkeypatch, capsys, "build", str(coll), "--images", str(images), *BUILD, "--allow-failures")[0]
        == 0
    )
    code, _, err = run(monkeypatch, capsys, "delete", str(coll), "999")
    assert code == 3 and "999" in err
    code, _, err = run(monkeypatch, capsys, "compact", str(coll), "--index-key", "Nope")
    assert code == 2 and "--index-key" in err
    with CollectionWriter(coll):
        code, _, err = run(monkeypatch, capsys, "delete", str(coll), "1")
    assert code == 4 and "pid" in err
    # another dual encoder on an existing collection: refused (a conflict), naming both
    other = ("--model", "open_clip:ViT-B-32", *BUILD[2:])
    code, _, err = run(monkeypatch, capsys, "build", str(coll), "--images", str(images), *other)
    assert code == 4 and "alignfuse:random-tiny" in err and "open_clip:ViT-B-32" in err
    assert Collection.open(coll).count("image") == 10


def test_models_lists_known_specs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(monkeypatch, capsys, "models")
    assert code == 0 and "alignfuse:random-tiny" in out


def test_build_from_captions_and_search_both_directions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    make_image_folder(tmp_path / "imgs", 4)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "imgs").rglob("*.*"))
    lines = [{"image": n, "caption": f"caption of {Path(n).stem}", "source": "test"} for n in names]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    coll = tmp_path / "c"
    code, out, err = run(
        monkeypatch, capsys, "build", str(coll), "--captions", str(tmp_path / "caps.jsonl"), *BUILD
    )
    assert code == 0, err
    assert "added 8 (4 images, 4 texts)" in out
    code, out, _ = run(monkeypatch, capsys, "search", str(coll), "--text", "caption of img0001", "-k", "2")
    assert code == 0 and "top 2 image items" in out
    code, out, _ = run(
        monkeypatch, capsys, "search", str(coll), "--image", str(tmp_path / names[0]), "-k", "2"
    )
    assert code == 0 and "top 2 text items" in out and "caption of" in out
    code, out, _ = run(monkeypatch, capsys, "search", str(coll), "--text", "x", "--target", "text", "-k", "1")
    assert code == 0 and "top 1 text items" in out
    # --modality: the deprecated alias of --target
    code, out, err = run(
        monkeypatch, capsys, "search", str(coll), "--text", "x", "--modality", "text", "-k", "1"
    )
    assert code == 0 and "top 1 text items" in out and "deprecated" in out + err


def test_build_with_the_onnx_runtime_matches_torch(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``build --runtime onnx``: the vectors come from ONNX Runtime and equal torch's (fp32, to ~1e-5)."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    vectors = {}
    for runtime in ("torch", "onnx"):
        coll = tmp_path / runtime
        args = ("build", str(coll), "--images", str(images), *BUILD, "--runtime", runtime, "--allow-failures")
        code, out, err = run(monkeypatch, capsys, *args)
        assert code == 0 and "added 10" in out, err
        with Collection.open(coll) as c:
            ids, vecs = c.vectors("image")
            uris = [str(it.uri) for it in c.get_many(ids)]
        vectors[runtime] = dict(zip(uris, np.asarray(vecs, dtype=np.float32), strict=True))
    assert vectors["torch"].keys() == vectors["onnx"].keys()
    for uri, v in vectors["torch"].items():
        assert np.abs(v - vectors["onnx"][uri]).max() < 1e-3, uri  # stored fp16: 1e-3 is its rounding
