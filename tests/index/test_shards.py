"""Embedding shards (clip-retrieval's layout) and ``alignfuse import``: each shard one committed segment, a
re-run imports only what is missing, a bad shard is absent (never half there), bad input names itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfuse.index import Collection, ImageFolderSource, IndexOptions
from alignfuse.index.shards import (
    ImportOptions,
    ShardData,
    import_shards,
    list_shards,
    read_shard,
    write_encoder_record,
    write_shard,
)
from alignfuse.index.types import NewItem
from alignfuse.models.base import DualEncoder

from .conftest import clustered, make_image_folder

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _shard(key: str, start: int, n: int, dim: int, captions: int = 2) -> ShardData:
    images = tuple(
        NewItem("image", f"mem://img{i}", f"{i:064x}", f"caption 0 of {i}", {"n": i})
        for i in range(start, start + n)
    )
    texts = tuple(
        NewItem(
            "text",
            f"mem://img{i}#caption{j}",
            f"t{i:059x}{j:04x}",
            f"caption {j} of {i}",
            {"image_uri": f"mem://img{i}"},
        )
        for i in range(start, start + n)
        for j in range(captions)
    )
    vecs = clustered(n * (1 + captions), dim, seed=start)
    return ShardData(key, images, vecs[:n], texts, vecs[n:])


def _run_cli(
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


def test_roundtrip_import_one_segment_per_shard_and_rerun(tmp_path: Path, tiny_encoder: DualEncoder) -> None:
    dim = tiny_encoder.embed_dim
    src = tmp_path / "shards"
    written = [_shard(f"{k:06d}", 10 * k, 10, dim) for k in range(3)]
    for s in written:
        write_shard(src, s)
    write_encoder_record(src, tiny_encoder.info)
    assert list_shards(src) == ["000000", "000001", "000002"]
    back = read_shard(src, "000001", dim=dim)
    assert back.images == written[1].images and back.texts == written[1].texts
    np.testing.assert_array_equal(back.image_vectors, written[1].image_vectors)

    coll = tmp_path / "c"
    r = import_shards(coll, src, options=ImportOptions(merge_at_end=False))  # the model from alignfuse.json
    assert (r.shards, r.added_images, r.added_texts, r.skipped_existing) == (3, 30, 60, 0)
    with Collection.open(coll) as c:
        assert c.version == 3 and len(c.manifest.segments) == 3  # one committed segment per shard
        assert c.manifest.encoder.matches(tiny_encoder.info)
        # captions are linked to their image, vectors are the shard's, search finds an item by its vector
        t = c.find_by_sha256(written[2].texts[3].sha256)
        assert t is not None and c.get(t.metadata["image_item_id"]).uri == "mem://img21"
        res = c.search(written[2].image_vectors[:1], 1, "image")
        assert c.get(int(res.ids[0, 0])).uri == "mem://img20"
    again = import_shards(coll, src)
    assert (again.added, again.skipped_existing) == (0, 90)
    with Collection.open(coll) as c:
        assert c.count("image") == 30 and c.count("text") == 60


def test_bad_shard_is_absent_and_rerun_completes(tmp_path: Path, tiny_encoder: DualEncoder) -> None:
    dim = tiny_encoder.embed_dim
    src = tmp_path / "shards"
    for k in range(3):
        write_shard(src, _shard(f"{k:06d}", 10 * k, 10, dim))
    good = np.load(src / "img_emb" / "img_emb_000001.npy")
    np.save(src / "img_emb" / "img_emb_000001.npy", good[:, : dim - 1])  # a truncated shard
    with pytest.raises(Exception, match="--model: .*img_emb_000001.npy holds"):
        import_shards(tmp_path / "c", src, encoder=tiny_encoder.info)
    with Collection.open(tmp_path / "c") as c:  # shard 0 committed, shard 1 absent: nothing half there
        assert c.version == 1 and c.count("image") == 10 and c.count("text") == 20
    np.save(src / "img_emb" / "img_emb_000001.npy", good)
    r = import_shards(tmp_path / "c", src, encoder=tiny_encoder.info)
    assert (r.added_images, r.added_texts, r.skipped_existing) == (20, 40, 30)
    with Collection.open(tmp_path / "c") as c:
        assert c.count("image") == 30 and c.count("text") == 60


def _clip_retrieval_layout(root: Path, images: list[Path], encoder: DualEncoder) -> np.ndarray:
    """What ``clip-retrieval inference`` writes for a folder: fp16 embeddings, metadata with image_path and
    caption, text_emb row j = the caption of metadata row j."""
    from PIL import Image

    with torch.inference_mode():
        pix = torch.stack([encoder.image_transform(Image.open(p).convert("RGB")) for p in images])
        img = encoder.encode_images(pix)
        txt = encoder.encode_texts([f"picture {p.stem}" for p in images])
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    half = len(images) // 2
    for k, sl in enumerate((slice(0, half), slice(half, None))):
        np.save(root / "img_emb" / f"img_emb_{k}.npy", img[sl].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{k}.npy", txt[sl].astype(np.float16))
        table = pa.table(
            {
                "image_path": [str(p) for p in images[sl]],
                "caption": [f"picture {p.stem}" for p in images[sl]],
            }
        )
        pq.write_table(table, root / "metadata" / f"metadata_{k}.parquet")
    return img


def test_cli_import_clip_retrieval_layout_then_add_skips_same_files(
    tmp_path: Path,
    tiny_encoder: DualEncoder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images = make_image_folder(tmp_path / "images", 8)
    paths = [it.path for it in ImageFolderSource(tmp_path / "images").items() if it.path is not None]
    assert len(paths) == len(images)
    src = tmp_path / "cr"
    img = _clip_retrieval_layout(src, paths, tiny_encoder)
    coll = tmp_path / "c"
    code, out, err = _run_cli(
        monkeypatch, capsys, "import", str(coll), str(src), "--model", "alignfuse:random-tiny"
    )
    assert code == 0, err
    assert "imported 2 shard(s), added 16 (8 images, 8 texts)" in out
    with Collection.open(coll) as c:
        assert len(c.manifest.segments) == 1  # merged at the end: one index chosen for the total
        ids, vecs = c.vectors("image")
        items = c.get_many(ids)
        by_uri = {it.uri: v for it, v in zip(items, vecs, strict=True)}
        np.testing.assert_allclose(by_uri[str(paths[3])], img[3], atol=2e-3)  # fp16 on disk
        cap = c.find_by_sha256(next(it.sha256 for it in c.get_many(c.vectors("text")[0])))
        assert cap is not None and cap.metadata["image_item_id"] in set(ids.tolist())
    # image rows are keyed by their file's bytes: a local `add` of the same folder encodes nothing new
    code, out, err = _run_cli(
        monkeypatch,
        capsys,
        "add",
        str(coll),
        "--images",
        str(tmp_path / "images"),
        "--workers",
        "0",
        "--no-progress",
    )
    assert code == 0, err
    assert "added 0 (0 images, 0 texts), skipped 8 already indexed" in out


def test_cli_import_bad_input_names_the_argument(
    tmp_path: Path,
    tiny_encoder: DualEncoder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dim = tiny_encoder.embed_dim
    src = tmp_path / "shards"
    write_shard(src, _shard("000000", 0, 4, dim, captions=0))
    code, _, err = _run_cli(monkeypatch, capsys, "import", str(tmp_path / "c"), str(src))
    assert code == 2 and "--model" in err  # no alignfuse.json: the model must be named
    code, _, err = _run_cli(monkeypatch, capsys, "import", str(tmp_path / "c"), str(tmp_path / "nowhere"))
    assert code == 3 and "SHARDS" in err
    code, _, err = _run_cli(monkeypatch, capsys, "import", str(tmp_path / "c"), str(tmp_path))
    assert code == 2 and "no metadata/metadata_*.parquet" in err
    np.save(src / "img_emb" / "img_emb_000000.npy", 3 * clustered(4, dim))
    code, _, err = _run_cli(
        monkeypatch, capsys, "import", str(tmp_path / "c"), str(src), "--model", "alignfuse:random-tiny"
    )
    assert code == 2 and "not L2-normalised" in err and "--renormalize" in err
    code, out, err = _run_cli(
        monkeypatch,
        capsys,
        "import",
        str(tmp_path / "c"),
        str(src),
        "--model",
        "alignfuse:random-tiny",
        "--renormalize",
    )
    assert code == 0 and "added 4 (4 images, 0 texts)" in out, err
    write_encoder_record(src, tiny_encoder.info)
    rec = json.loads((src / "alignfuse.json").read_text())
    rec["weights_sha256"] = "0" * 64
    (src / "alignfuse.json").write_text(json.dumps(rec))
    code, _, err = _run_cli(
        monkeypatch, capsys, "import", str(tmp_path / "c"), str(src), "--model", "alignfuse:random-tiny"
    )
    assert code == 2 and "--model" in err and "was made by" in err


def test_merging_import_builds_the_real_index_once(tmp_path: Path, tiny_encoder: DualEncoder) -> None:
    """Per-shard segments that the import merges at its end are Flat (cheap); only the merge builds the
    collection's index, chosen for the total. A re-run that adds one shard re-indexes that one segment."""
    dim = tiny_encoder.embed_dim
    src = tmp_path / "shards"
    for k in range(3):
        write_shard(src, _shard(f"{k:06d}", 10 * k, 10, dim, captions=0))
    coll = tmp_path / "c"
    opts = ImportOptions(index=IndexOptions(index_key="HNSW16"))
    r = import_shards(coll, src, encoder=tiny_encoder.info, options=opts)
    assert r.added_images == 30
    with Collection.open(coll) as c:
        (seg,) = c.manifest.segments
        assert [p.index_key for _, p in seg.parts] == ["HNSW16"]
        interim = [json.loads((coll / "versions" / f"{v:06d}.json").read_text()) for v in (1, 2, 3)]
        for m in interim:
            assert {p["index_key"] for s in m["segments"] for p in s["parts"].values()} == {"Flat"}
    write_shard(src, _shard("000003", 30, 10, dim, captions=0))
    r = import_shards(coll, src, encoder=tiny_encoder.info, options=opts)
    assert (r.added_images, r.skipped_existing) == (10, 30)
    with Collection.open(coll) as c:
        assert {p.index_key for s in c.manifest.segments for _, p in s.parts} == {"HNSW16"}
        assert c.count("image") == 40
        res = c.search(np.load(src / "img_emb" / "img_emb_000003.npy")[:1], 1, "image")
        assert c.get(int(res.ids[0, 0])).uri == "mem://img30"


def test_clip_retrieval_text_only_and_flattened_metadata_columns(
    tmp_path: Path, tiny_encoder: DualEncoder
) -> None:
    """clip-retrieval's writer flattens the source's metadata JSON into columns (url, width, ...) and, run
    with --enable_image False, writes captions and text_emb without any image column."""
    dim = tiny_encoder.embed_dim
    vecs = clustered(6, dim, seed=9)
    src = tmp_path / "cr"
    for sub in ("img_emb", "text_emb", "metadata"):
        (src / sub).mkdir(parents=True)
    np.save(src / "img_emb" / "img_emb_0.npy", vecs[:3].astype(np.float16))
    pq.write_table(
        pa.table(
            {
                "image_path": ["a.jpg", "b.jpg", "c.jpg"],
                "url": ["http://x/a", None, "http://x/c"],
                "width": [640, 480, 320],
            }
        ),
        src / "metadata" / "metadata_0.parquet",
    )
    np.save(src / "text_emb" / "text_emb_1.npy", vecs[3:].astype(np.float16))
    pq.write_table(pa.table({"caption": ["one", "two", "three"]}), src / "metadata" / "metadata_1.parquet")
    coll = tmp_path / "c"
    r = import_shards(coll, src, encoder=tiny_encoder.info)
    assert (r.added_images, r.added_texts) == (3, 3)
    with Collection.open(coll) as c:
        img = c.get_many(c.vectors("image")[0])
        assert [(i.uri, i.metadata.get("url"), i.metadata.get("width")) for i in img] == [
            ("a.jpg", "http://x/a", 640),
            ("b.jpg", None, 480),
            ("c.jpg", "http://x/c", 320),
        ]
        ids, _ = c.vectors("text")
        assert sorted(t.text or "" for t in c.get_many(ids)) == ["one", "three", "two"]
        res = c.search(vecs[4:5], 1, "text")
        assert c.get(int(res.ids[0, 0])).text == "two"
        assert c.manifest.encoder.matches(tiny_encoder.info)  # the model that made them is recorded


def test_cli_import_wrong_dimension_names_model(
    tmp_path: Path,
    tiny_encoder: DualEncoder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = tmp_path / "shards"
    write_shard(src, _shard("000000", 0, 4, tiny_encoder.embed_dim + 8, captions=0))
    code, _, err = _run_cli(
        monkeypatch, capsys, "import", str(tmp_path / "c"), str(src), "--model", "alignfuse:random-tiny"
    )
    assert code == 2 and "--model" in err and f"{tiny_encoder.embed_dim + 8}-d" in err


def test_adds_never_leave_an_unbounded_number_of_segments(tmp_path: Path, tiny_encoder: DualEncoder) -> None:
    """Twelve adds of ten items: the tenth commit merges the ten small segments (merge policy), so searches
    fan out over 3 segments, not 12; with merge_factor=0 the 12 stay (compaction is then manual)."""
    dim = tiny_encoder.embed_dim
    src = tmp_path / "shards"
    for k in range(12):
        write_shard(src, _shard(f"{k:06d}", 10 * k, 10, dim, captions=0))
    for factor, expected in ((10, [100, 10, 10]), (0, [10] * 12)):
        coll = tmp_path / f"c{factor}"
        opts = ImportOptions(index=IndexOptions(merge_factor=factor), merge_at_end=False)
        r = import_shards(coll, src, encoder=tiny_encoder.info, options=opts)
        assert r.added_images == 120
        with Collection.open(coll) as c:
            assert [s.count() for s in c.manifest.segments] == expected
            assert c.count("image") == 120
            first = np.load(src / "img_emb" / "img_emb_000000.npy")[:1]
            assert c.get(int(c.search(first, 1, "image").ids[0, 0])).uri == "mem://img0"


def test_commit_counts_are_incremental_and_exact(tmp_path: Path, tiny_encoder: DualEncoder) -> None:
    """A commit updates the manifest's counts from what it changed (no scan of all items: an add stays
    O(M)); they equal a full recount after adds, deletes (also of items staged in the same commit) and
    compaction."""
    from alignfuse.index.collection import CollectionWriter
    from alignfuse.index.store import connect_ro, live_counts

    dim = tiny_encoder.embed_dim
    src = tmp_path / "shards"
    for k in range(2):
        write_shard(src, _shard(f"{k:06d}", 10 * k, 10, dim, captions=2))
    coll = tmp_path / "c"
    import_shards(coll, src, encoder=tiny_encoder.info)
    with Collection.open(coll) as c:
        c.delete([1, 2, 25])
        with CollectionWriter(coll) as w:
            extra = _shard("x", 100, 3, dim, captions=0)
            ids = w.add(list(extra.images), extra.image_vectors)
            w.delete([int(ids[0]), 3])
            w.commit()
        c.refresh()
        c.compact()
        for extra_deletes in range(2):
            db = connect_ro(coll)
            try:
                assert c.manifest.counts == live_counts(db, c.version)
            finally:
                db.close()
            assert dict(c.manifest.counts)["deleted"] == 5 + extra_deletes
            c.delete([4 + extra_deletes])
            c.refresh()
