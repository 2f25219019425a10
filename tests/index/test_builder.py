"""The streaming builder with the real random-tiny dual encoder: corrupt files, incremental adds that
encode only new items, captioned sources, rerank cache, workers, encoder mismatch, JPEG draft decoding."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.errors import EncoderMismatchError, InvalidInputError, NotFoundError
from alignfuse.index import (
    BuildOptions,
    Collection,
    ImageFolderSource,
    KarpathySource,
    TextSource,
    build_collection,
)
from alignfuse.index.builder import _ItemDataset
from alignfuse.index.collection import ShaLookup

from .conftest import CountingEncoder, FakeCrossEncoder, brute_force, draw_image, make_image_folder

OPTS = BuildOptions(batch_size=8, commit_every=12, progress=False)


def _corrupt_files(root: Path) -> dict[str, str]:
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_bytes(b"this is not an image")
    good = draw_image(root / "tmp_full.png", seed=99, size=(64, 64)).read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "tmp_full.png").unlink()
    jpg = draw_image(root / "tmp_full.jpg", seed=98, size=(64, 64)).read_bytes()
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (root / "tmp_full.jpg").unlink()
    return {
        "zero.jpg": "empty",
        "text.png": "not an image",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
    }


def test_build_folder_with_corrupt_files_reports_and_skips_them(
    tmp_path: Path, counting: CountingEncoder
) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 20)
    bad = _corrupt_files(images)
    report = build_collection(tmp_path / "c", ImageFolderSource(images), counting, options=OPTS)
    assert report.added == report.added_images == 20
    failed = {Path(u).name: r for u, r in report.failed}
    assert set(failed) == set(bad)
    for name, word in bad.items():
        assert word in failed[name], (name, failed[name])
    assert counting.images_encoded == 20
    assert report.commits >= 2 and report.version == report.commits + 1  # + merging this run's segments

    c = Collection.open(tmp_path / "c", encoder=counting.info)
    assert c.count("image") == 20 and c.count("text") == 0
    assert len(c.manifest.segments) == 1
    # build then search == numpy brute force over the same stored vectors
    q = counting.encode_texts(["a red square", "a blue circle", "green"])
    ids, vecs = c.vectors("image")
    res = c.search(q, 5, "image")
    np.testing.assert_array_equal(res.ids, brute_force(ids, vecs, q, 5)[0])
    # the stored vector of an image is the encoder's output for that file
    item = c.list(limit=1)[0]
    with Image.open(item.uri) as img:
        direct = counting.inner.encode_images(counting.image_transform(img.convert("RGB")).unsqueeze(0))
    np.testing.assert_allclose(c.get_vectors([item.id], "image"), direct, atol=1e-5)


def test_adding_m_items_encodes_only_m(tmp_path: Path, counting: CountingEncoder) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 24)
    build_collection(tmp_path / "c", ImageFolderSource(images), counting, options=OPTS)
    assert counting.images_encoded == 24
    make_image_folder(images, 5, start=24)
    counting.images_encoded = 0
    report = build_collection(
        tmp_path / "c", ImageFolderSource(images), counting, options=OPTS, must_exist=True
    )
    assert (report.added, report.skipped_existing, counting.images_encoded) == (5, 24, 5)
    # re-running the same command encodes nothing
    counting.images_encoded = 0
    report = build_collection(tmp_path / "c", ImageFolderSource(images), counting, options=OPTS)
    assert (report.added, report.skipped_existing, counting.images_encoded) == (0, 29, 0)
    c = Collection.open(tmp_path / "c")
    assert c.count("image") == 29
    assert len({i.sha256 for i in c.list(limit=100)}) == 29
    with pytest.raises(NotFoundError):
        build_collection(
            tmp_path / "other", ImageFolderSource(images), counting, options=OPTS, must_exist=True
        )


def test_duplicate_content_is_indexed_once(tmp_path: Path, counting: CountingEncoder) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 3)
    (images / "copy.jpg").write_bytes((images / "img0001.png").read_bytes())
    report = build_collection(tmp_path / "c", ImageFolderSource(images), counting, options=OPTS)
    assert (report.added, report.skipped_existing) == (3, 1)


def test_karpathy_build_links_captions_to_images(tmp_path: Path, counting: CountingEncoder) -> None:
    root = tmp_path / "coco"
    recs = []
    for i in range(6):
        draw_image(root / "val" / f"{i}.jpg", seed=i)
        recs.append(
            {"image": f"val/{i}.jpg", "caption": [f"picture number {i}", f"image {i}"], "image_id": i}
        )
    recs.append({"image": "val/missing.jpg", "caption": "gone"})
    f = tmp_path / "test.json"
    f.write_text(json.dumps(recs))
    report = build_collection(tmp_path / "c", KarpathySource(f, image_root=root), counting, options=OPTS)
    assert (report.added_images, report.added_texts) == (6, 12)  # the missing image's caption goes with it
    assert [(Path(u).name, r) for u, r in report.failed] == [
        ("missing.jpg", "file not found (skipped with 1 caption)")
    ]
    c = Collection.open(tmp_path / "c")
    texts = c.list(kind="text", limit=100)
    by_uri = {i.uri: i for i in c.list(kind="image", limit=100)}
    linked = [t for t in texts if "image_item_id" in t.metadata]
    assert len(linked) == 12
    for t in linked:
        img = c.get(t.metadata["image_item_id"])
        assert img.uri == t.metadata["image_uri"] and t.text in img.metadata["captions"]
        assert by_uri[img.uri].metadata["image_id"] == t.metadata["image_id"]
    # both directions search
    q_img = c.get_vectors([linked[0].metadata["image_item_id"]], "image")
    assert c.search(q_img, 3, "text").row(0)
    q_txt = c.get_vectors([linked[0].id], "text")
    assert c.search(q_txt, 3, "image").row(0)


def test_text_only_source(tmp_path: Path, counting: CountingEncoder) -> None:
    report = build_collection(tmp_path / "c", TextSource(["one", "two", "three"]), counting, options=OPTS)
    assert (report.added_texts, counting.texts_encoded, counting.images_encoded) == (3, 3, 0)


def test_rerank_cache_is_filled_with_cross_encoder_tokens(tmp_path: Path, counting: CountingEncoder) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 10)
    cross = FakeCrossEncoder()
    opts = replace(OPTS, rerank_cache=True)
    report = build_collection(
        tmp_path / "c", ImageFolderSource(images), counting, options=opts, cross_encoder=cross
    )
    assert report.features_added == 10
    c = Collection.open(tmp_path / "c")
    assert c.manifest.reranker is not None and c.manifest.reranker.spec == "test:fake-cross"
    fc = c.features
    assert fc is not None and len(fc) == 10 and fc.token_shape == (16, 16)
    item = c.list(limit=1)[0]
    with Image.open(item.uri) as img:
        want = cross.image_states(cross.image_transform(img).unsqueeze(0)).tokens.numpy().astype(np.float16)
    np.testing.assert_allclose(fc.get([item.id]).astype(np.float32), want.astype(np.float32), atol=1e-2)
    with pytest.raises(InvalidInputError, match="reranker"):
        build_collection(tmp_path / "d", ImageFolderSource(images), counting, options=opts)
    with pytest.raises(EncoderMismatchError, match="reranker"):
        build_collection(
            tmp_path / "c",
            ImageFolderSource(images),
            counting,
            options=opts,
            cross_encoder=FakeCrossEncoder(sha="d" * 64),
        )


def test_mismatched_encoder_is_refused(tmp_path: Path, counting: CountingEncoder) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 3)
    build_collection(tmp_path / "c", ImageFolderSource(images), counting, options=OPTS)
    counting.info = replace(counting.info, weights_sha256="0" * 64)
    with pytest.raises(EncoderMismatchError, match="alignfuse:random-tiny"):
        build_collection(tmp_path / "c", ImageFolderSource(images), counting, options=OPTS)


def test_workers_give_the_same_collection_as_in_process(tmp_path: Path, counting: CountingEncoder) -> None:
    images = tmp_path / "images"
    make_image_folder(images, 16)
    build_collection(tmp_path / "a", ImageFolderSource(images), counting, options=OPTS)
    build_collection(
        tmp_path / "b", ImageFolderSource(images), counting, options=replace(OPTS, num_workers=2)
    )
    a, b = Collection.open(tmp_path / "a"), Collection.open(tmp_path / "b")
    ia, va = a.vectors("image")
    ib, vb = b.vectors("image")
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(va, vb, atol=1e-6)
    assert [i.uri for i in a.list(limit=50)] == [i.uri for i in b.list(limit=50)]


def test_big_jpegs_are_decoded_in_draft_mode(tmp_path: Path) -> None:
    from alignfuse.index.sources import SourceItem

    p = draw_image(tmp_path / "big.jpg", seed=1, size=(1024, 768))
    sizes: list[tuple[int, int]] = []

    def transform(img: Image.Image) -> torch.Tensor:
        sizes.append(img.size)
        return torch.zeros(3, 4, 4)

    item = SourceItem(kind="image", uri=str(p), path=p)
    lookup = ShaLookup(tmp_path, 0)
    # draft: the smallest 1/2^k JPEG scale that keeps both sides >= 224 (1/4 would make 192 < 224)
    for draft, expect in ((True, (512, 384)), (False, (1024, 768))):
        ds = _ItemDataset([item], [transform], 224, lookup, replace(OPTS, draft=draft))
        assert ds[0].status == "ok"
        assert sizes[-1] == expect
    small = replace(OPTS, max_image_pixels=1000)
    rec = _ItemDataset([item], [transform], 224, lookup, small)[0]
    assert rec.status == "failed" and "too large" in rec.reason
