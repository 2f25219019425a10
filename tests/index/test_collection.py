"""Collections on disk: create/open, add/commit, search = brute force, delete, compaction, refresh,
uncommitted changes invisible, encoder checks, feature cache, garbage collection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from alignfuse.errors import ConflictError, EncoderMismatchError, InvalidInputError, NotFoundError
from alignfuse.index import Collection, IndexOptions, Kind, NewItem
from alignfuse.index.collection import CollectionWriter
from alignfuse.models.base import ModelInfo, Preprocess

from .conftest import brute_force, clustered

DIM = 16
INFO = ModelInfo(
    spec="test:vectors",
    family="test",
    arch="none",
    weights="random-init",
    weights_sha256="a" * 64,
    embed_dim=DIM,
    preprocess=Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
)
RERANKER = replace(INFO, spec="test:reranker", weights_sha256="b" * 64)


def _items(kind: Kind, start: int, n: int) -> list[NewItem]:
    return [
        NewItem(
            kind=kind, uri=f"{kind}://{i}", sha256=f"{kind}-{i:08d}", text=f"{kind} {i}", metadata={"n": i}
        )
        for i in range(start, start + n)
    ]


def _add(c: Collection, kind: Kind, start: int, n: int, seed: int) -> np.ndarray:
    with c.writer() as w:
        ids = w.add(_items(kind, start, n), clustered(n, DIM, seed=seed))
        w.commit()
    c.refresh()
    return ids


@pytest.fixture
def coll(tmp_path: Path) -> Collection:
    return Collection.create(tmp_path / "c", INFO)


def test_create_writes_the_documented_layout(tmp_path: Path) -> None:
    c = Collection.create(tmp_path / "c", INFO, reranker=RERANKER)
    root = tmp_path / "c"
    for name in ("manifest.json", "items.sqlite", "segments", "versions", "features", "versions/000000.json"):
        assert (root / name).exists(), name
    m = json.loads((root / "manifest.json").read_text())
    assert m["version"] == 0 and m["schema_version"] == 1
    assert m["encoder"]["spec"] == "test:vectors" and m["encoder"]["embed_dim"] == DIM
    assert m["encoder"]["weights_sha256"] == "a" * 64
    assert m["encoder"]["preprocess"]["image_size"] == 32
    assert m["reranker"]["spec"] == "test:reranker"
    assert m["index"] == {"key": "auto", "metric": "inner_product", "normalized": True}
    assert c.count() == 0 and c.version == 0
    with pytest.raises(ConflictError, match="already exists"):
        Collection.create(root, INFO)


def test_create_refuses_a_non_empty_folder_and_open_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ConflictError, match="not empty"):
        Collection.create(tmp_path / "x", INFO)
    with pytest.raises(NotFoundError):
        Collection.open(tmp_path / "nope")
    with pytest.raises(NotFoundError, match="not a collection"):
        Collection.open(tmp_path / "x")


def test_search_over_segments_equals_numpy_brute_force(coll: Collection) -> None:
    _add(coll, "image", 0, 300, seed=1)
    _add(coll, "image", 300, 200, seed=2)
    _add(coll, "text", 0, 150, seed=3)
    assert len(coll.manifest.segments) == 3
    assert coll.count("image") == 500 and coll.count("text") == 150
    q = clustered(20, DIM, seed=9)
    for modality in ("image", "text"):
        res = coll.search(q, 10, modality)
        ids, vecs = coll.vectors(modality)
        want_ids, want_scores = brute_force(ids, vecs, q, 10)
        np.testing.assert_array_equal(res.ids, want_ids)
        np.testing.assert_allclose(res.scores, want_scores, rtol=1e-5, atol=1e-5)
    # stored vectors are the L2-normalised inputs
    _, vecs = coll.vectors("image")
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # k larger than the collection: padded with -1 / -inf
    res = coll.search(q[:1], 200, "text")
    assert (res.ids[0, :150] >= 0).all() and (res.ids[0, 150:] == -1).all()
    assert np.isneginf(res.scores[0, 150:]).all()


def test_ties_are_broken_by_id(coll: Collection) -> None:
    v = clustered(1, DIM, seed=4)
    with coll.writer() as w:
        w.add(_items("image", 0, 3), np.repeat(v, 3, axis=0))
        w.add(_items("image", 3, 2), np.repeat(v, 2, axis=0))
        w.commit()
    coll.refresh()
    assert coll.search(v, 5, "image").ids[0].tolist() == [1, 2, 3, 4, 5]


def test_items_get_list_count_and_metadata(coll: Collection) -> None:
    ids = _add(coll, "image", 0, 5, seed=1)
    item = coll.get(int(ids[2]))
    assert (item.kind, item.uri, item.text, dict(item.metadata), item.state) == (
        "image",
        "image://2",
        "image 2",
        {"n": 2},
        "live",
    )
    assert [i.id for i in coll.get_many([ids[4], ids[0]])] == [ids[4], ids[0]]
    assert [i.id for i in coll.list(offset=1, limit=2)] == ids[1:3].tolist()
    assert coll.find_by_sha256("image-00000003").id == ids[3]  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        coll.get(999)
    with pytest.raises(NotFoundError):
        coll.get_many([ids[0], 999])
    np.testing.assert_allclose(coll.get_vectors([ids[1]], "image"), coll.vectors("image")[1][1:2])


def test_delete_filters_results_with_overfetch_and_survives_reopen(coll: Collection, tmp_path: Path) -> None:
    _add(coll, "image", 0, 200, seed=1)
    q = clustered(5, DIM, seed=9)
    before = coll.search(q, 10, "image")
    doomed = sorted({int(i) for i in before.ids[:, :8].ravel()})  # most of every top-10
    v = coll.delete(doomed)
    assert v == coll.version == 2
    after = coll.search(q, 10, "image")
    assert not set(after.ids.ravel().tolist()) & set(doomed)
    assert (after.ids >= 0).all(), "over-fetch must still return k live results"
    ids, vecs = coll.vectors("image")
    assert len(ids) == 200 - len(doomed)
    np.testing.assert_array_equal(after.ids, brute_force(ids, vecs, q, 10)[0])
    assert coll.get(doomed[0]).state == "deleted"
    assert coll.count("image") == 200 - len(doomed)
    assert coll.manifest.tombstone_count == len(doomed)
    reopened = Collection.open(tmp_path / "c")
    np.testing.assert_array_equal(reopened.search(q, 10, "image").ids, after.ids)
    with pytest.raises(NotFoundError, match="no live items"):
        coll.delete([doomed[0]])
    with pytest.raises(NotFoundError):
        coll.get_vectors([doomed[0]], "image")


def test_compaction_keeps_results_and_drops_tombstones(coll: Collection, tmp_path: Path) -> None:
    for s in range(4):
        _add(coll, "image", s * 100, 100, seed=s)
    _add(coll, "text", 0, 50, seed=7)
    coll.delete(list(range(10, 60)) + [405])
    q = clustered(8, DIM, seed=9)
    want = {m: coll.search(q, 10, m) for m in ("image", "text")}
    old_segments = {s.id for s in coll.manifest.segments}
    v = coll.compact()
    m = coll.manifest
    assert len(m.segments) == 1 and m.tombstones is None and m.tombstone_count == 0
    assert m.segments[0].count("image") == 350 and m.segments[0].count("text") == 49
    for mod in ("image", "text"):
        got = coll.search(q, 10, mod)
        np.testing.assert_array_equal(got.ids, want[mod].ids)
        np.testing.assert_allclose(got.scores, want[mod].scores, atol=1e-5)
    # a later commit garbage-collects segments that only older versions referenced
    _add(coll, "text", 100, 1, seed=8)
    left = {p.name for p in (tmp_path / "c" / "segments").iterdir()}
    assert not left & old_segments
    assert coll.version == v + 1


def test_compaction_rederives_indexes_with_a_new_key_without_reencoding(coll: Collection) -> None:
    _add(coll, "image", 0, 400, seed=1)
    _add(coll, "image", 400, 400, seed=2)
    q = clustered(10, DIM, seed=9)
    exact = coll.search(q, 10, "image")
    coll.compact("HNSW16")
    assert coll.manifest.index_key == "HNSW16"
    assert coll.manifest.segments[0].part("image").index_key == "HNSW16"  # type: ignore[union-attr]
    hnsw = coll.search(q, 10, "image")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw.ids, exact.ids, strict=True)])
    assert recall >= 0.9
    # the stored embeddings (the source of truth) are unchanged by re-indexing
    _, vecs = coll.vectors("image")
    assert vecs.shape == (800, DIM)


def test_uncommitted_changes_are_invisible_and_rolled_back(coll: Collection, tmp_path: Path) -> None:
    _add(coll, "image", 0, 10, seed=1)
    w = coll.writer()
    w.add(_items("image", 10, 5), clustered(5, DIM, seed=2))
    w.delete([1, 2])
    reader = Collection.open(tmp_path / "c")
    assert reader.version == 1 and reader.count("image") == 10
    assert reader.get(1).state == "live"
    with pytest.raises(NotFoundError):
        reader.get(11)
    assert not reader.refresh()
    w.close()  # leaving without commit rolls back
    with CollectionWriter(tmp_path / "c") as w2:
        assert w2.base_version == 1 and w2.pending == 0
        ids = w2.add(_items("image", 10, 1), clustered(1, DIM, seed=3))
        assert ids.tolist() == [11], "ids of rolled-back rows are reused"
        w2.commit()
    assert reader.refresh() and reader.count("image") == 11


def test_writer_rolls_back_on_exception(coll: Collection) -> None:
    with pytest.raises(RuntimeError), coll.writer() as w:
        w.add(_items("image", 0, 3), clustered(3, DIM, seed=1))
        raise RuntimeError("boom")
    assert coll.writer().base_version == 0  # the lock was released too
    assert coll.count() == 0


def test_second_writer_is_refused(coll: Collection) -> None:
    with coll.writer(), pytest.raises(ConflictError, match="pid"):
        coll.writer()


def test_refresh_picks_up_new_versions_and_open_old_versions(coll: Collection, tmp_path: Path) -> None:
    reader = Collection.open(tmp_path / "c")
    _add(coll, "image", 0, 10, seed=1)
    assert reader.version == 0 and reader.count() == 0
    assert reader.refresh() and reader.version == 1 and reader.count() == 10
    assert not reader.refresh()
    _add(coll, "image", 10, 10, seed=2)
    old = Collection.open(tmp_path / "c", version=1)
    assert old.count() == 10 and old.version == 1
    assert old.search(clustered(1, DIM, seed=5), 20, "image").row(0).__len__() == 10
    with pytest.raises(NotFoundError):
        Collection.open(tmp_path / "c", version=99)


def test_encoder_mismatch_is_refused_naming_both(coll: Collection, tmp_path: Path) -> None:
    other = replace(INFO, weights_sha256="f" * 64)
    with pytest.raises(EncoderMismatchError, match="test:vectors") as info:
        Collection.open(tmp_path / "c", encoder=other)
    assert "ffffffffffff" in str(info.value) and "aaaaaaaaaaaa" in str(info.value)
    with pytest.raises(EncoderMismatchError, match="open_clip:ViT-B-32"):
        coll.check_encoder(replace(INFO, spec="open_clip:ViT-B-32"))
    Collection.open(tmp_path / "c", encoder=INFO).check_encoder(INFO)


def test_bad_inputs(coll: Collection) -> None:
    with pytest.raises(InvalidInputError, match="shape"):
        coll.search(np.zeros((1, DIM + 1), np.float32), 5, "image")
    with pytest.raises(InvalidInputError):
        coll.search(np.zeros((1, DIM), np.float32), 0, "image")
    with pytest.raises(InvalidInputError):
        coll.search(np.zeros((1, DIM), np.float32), 5, "audio")  # type: ignore[arg-type]
    with coll.writer() as w:
        with pytest.raises(InvalidInputError):
            w.add(_items("image", 0, 2), np.zeros((2, DIM), np.float32))
        with pytest.raises(InvalidInputError):
            w.add(_items("image", 0, 2), np.ones((3, DIM), np.float32))
    with pytest.raises(InvalidInputError):
        Collection.create(coll.path.parent / "bad", INFO, options=IndexOptions(index_key="Nope"))


def test_feature_cache_roundtrip_delete_and_compaction(coll: Collection) -> None:
    ids = _add(coll, "image", 0, 6, seed=1)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((6, 5, 4)).astype(np.float16)
    with coll.writer() as w:
        w.put_features(ids[:4], tokens[:4], RERANKER)
        w.commit()
    with coll.writer() as w:
        w.put_features(ids[4:], tokens[4:], RERANKER)
        with pytest.raises(EncoderMismatchError):
            w.put_features(ids[:1], tokens[:1], replace(RERANKER, weights_sha256="0" * 64))
        with pytest.raises(InvalidInputError):
            w.put_features(ids[:1], np.zeros((1, 3, 4), np.float16), RERANKER)
        w.commit()
    coll.refresh()
    fc = coll.features
    assert fc is not None and len(fc) == 6 and fc.token_shape == (5, 4)
    assert fc.reranker.spec == "test:reranker" and coll.manifest.reranker is not None
    order = [int(ids[5]), int(ids[0]), int(ids[3])]
    np.testing.assert_array_equal(fc.get(order), tokens[[5, 0, 3]])
    assert fc.has([int(ids[0]), 999]).tolist() == [True, False]
    with pytest.raises(NotFoundError):
        fc.get([999])
    coll.delete([int(ids[0])])
    assert int(ids[0]) not in coll.features  # type: ignore[operator]
    coll.compact()
    fc = coll.features
    assert fc is not None and len(fc) == 5 and len(coll.manifest.features.chunks) == 1  # type: ignore[union-attr]
    np.testing.assert_array_equal(fc.get(ids[1:]), tokens[1:])


def test_a_new_writer_cleans_up_what_a_killed_writer_left(coll: Collection, tmp_path: Path) -> None:
    _add(coll, "image", 0, 10, seed=1)
    root = tmp_path / "c"
    # leftovers of a writer killed before its commit switched the manifest
    (root / "segments" / "seg-000002").mkdir()
    (root / "segments" / "seg-000002" / "image.npy").write_bytes(b"partial")
    (root / "tombstones" / "000002.npy").write_bytes(b"partial")
    (root / "features" / "f000002.npy").write_bytes(b"partial")
    (root / "manifest.json.tmp").write_text("{")
    import sqlite3

    db = sqlite3.connect(root / "items.sqlite")
    with db:
        db.execute(
            "INSERT INTO items (id, kind, uri, sha256, metadata, state, version_added) "
            "VALUES (11, 'image', 'x', 'y', '{}', 'live', 2)"
        )
        db.execute("UPDATE items SET state = 'deleted', version_deleted = 2 WHERE id = 3")
    db.close()
    reader = Collection.open(root)
    assert reader.count("image") == 10 and reader.get(3).state == "live"
    with pytest.raises(NotFoundError):
        reader.get(11)
    with CollectionWriter(root) as w:
        assert w.base_version == 1
    assert sorted(p.name for p in (root / "segments").iterdir()) == ["seg-000001"]
    assert list((root / "tombstones").iterdir()) == [] and list((root / "features").iterdir()) == []
    assert not (root / "manifest.json.tmp").exists()
    db = sqlite3.connect(root / "items.sqlite")
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 10
    assert db.execute("SELECT state FROM items WHERE id = 3").fetchone()[0] == "live"
    db.close()


def test_a_reader_keeps_searching_its_version_while_a_writer_compacts(
    coll: Collection, tmp_path: Path
) -> None:
    _add(coll, "image", 0, 50, seed=1)
    _add(coll, "image", 50, 50, seed=2)
    reader = Collection.open(tmp_path / "c")
    q = clustered(3, DIM, seed=9)
    before = reader.search(q, 5, "image")
    coll.delete([int(before.ids[0, 0])])
    coll.compact()
    _add(coll, "image", 100, 1, seed=3)  # this commit garbage-collects the pre-compaction segments
    assert not (tmp_path / "c" / "segments" / "seg-000001").exists()
    np.testing.assert_array_equal(reader.search(q, 5, "image").ids, before.ids)  # old snapshot still works
    assert len(reader.vectors("image")[0]) == 100
    assert reader.refresh() and reader.version == coll.version
    assert int(before.ids[0, 0]) not in reader.search(q, 5, "image").ids[0]


def test_merge_of_some_segments_keeps_results(coll: Collection) -> None:
    for s in range(4):
        _add(coll, "image", s * 50, 50, seed=s)
    _add(coll, "text", 0, 20, seed=9)
    coll.delete([3, 60])
    q = clustered(6, DIM, seed=7)
    want = {m: coll.search(q, 8, m).ids for m in ("image", "text")}
    segs = [s.id for s in coll.manifest.segments]
    with coll.writer() as w:
        v = w.merge(segs[1:3])
        assert w.merge(segs[:1]) == v  # one segment: nothing to merge
        with pytest.raises(NotFoundError):
            w.merge(["seg-999999"])
    coll.refresh()
    got = [s.id for s in coll.manifest.segments]
    assert got == [segs[0], f"seg-{v:06d}", segs[3], segs[4]]
    assert coll.manifest.segments[1].count("image") == 99  # id 60 dropped
    for m in ("image", "text"):
        np.testing.assert_array_equal(coll.search(q, 8, m).ids, want[m])
    assert coll.count("image") == 198


def test_memory_mapped_reader_matches(coll: Collection, tmp_path: Path) -> None:
    _add(coll, "image", 0, 300, seed=1)
    coll.compact("HNSW16")
    _add(coll, "image", 300, 100, seed=2)
    q = clustered(5, DIM, seed=3)
    mm = Collection.open(tmp_path / "c", options=IndexOptions(mmap=True))
    np.testing.assert_array_equal(mm.search(q, 10, "image").ids, coll.search(q, 10, "image").ids)


def test_concurrent_searches_while_a_writer_commits_and_readers_refresh(coll: Collection) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _add(coll, "image", 0, 100, seed=1)
    q = clustered(4, DIM, seed=5)
    errors: list[BaseException] = []

    def searcher() -> int:
        n = 0
        for _ in range(60):
            try:
                res = coll.search(q, 5, "image")
                assert (res.ids >= 0).all()
                items = coll.get_many(res.ids[0])
                assert len(items) == 5
                n += 1
            except BaseException as exc:
                errors.append(exc)
        return n

    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(searcher) for _ in range(4)]
        for i in range(5):
            _add(coll, "image", 100 + 10 * i, 10, seed=10 + i)  # commits + refresh()
        coll.delete([1, 2, 3])
        coll.compact()
        done = [f.result() for f in futs]
    assert not errors, errors[0]
    assert sum(done) == 240
    assert coll.count("image") == 147


def test_requested_key_is_recorded_and_small_segments_fall_back_to_flat(tmp_path: Path) -> None:
    c = Collection.create(tmp_path / "ivf", INFO, options=IndexOptions(index_key="IVF64,Flat"))
    _add(c, "image", 0, 100, seed=1)
    assert c.manifest.index_key == "IVF64,Flat"
    assert c.manifest.segments[0].part("image").index_key == "Flat"  # type: ignore[union-attr]
    _add(c, "image", 100, 3000, seed=2)  # 39 * 64 = 2496 vectors are enough to train
    assert c.manifest.segments[1].part("image").index_key == "IVF64,Flat"  # type: ignore[union-attr]
    c.delete(list(range(1, 3101)))
    res = c.search(clustered(2, DIM, seed=3), 5, "image")
    assert (res.ids == -1).all() and c.count() == 0
