"""Recall metrics and group accuracy against brute-force references (numpy only, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from alignfuse.errors import InvalidInputError
from alignfuse.evaluation import (
    NON_CANDIDATE,
    group_accuracy,
    ranking,
    ranks_of,
    recall_metrics,
    topk_indices,
)

from .reference import assert_recall_equal, brute_group, brute_recall, gt_from_counts


def test_recall_hand_built_matrix() -> None:
    # 3 images x 6 texts, two captions per image.
    img2txt, txt2img = gt_from_counts([2, 2, 2])
    s = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: caption 0 first -> rank 0
            [0.9, 0.1, 0.2, 0.3, 0.0, 0.0],  # image 1: best own caption (3) is 2nd -> rank 1
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # image 2: best own caption (4) -> rank 4
        ]
    )
    rec = recall_metrics(s, img2txt, txt2img)
    assert rec.tr_r1 == pytest.approx(100 / 3)
    assert rec.tr_r5 == pytest.approx(100.0)
    # text->image columns: t0 [.9,.9,.9] tie -> image 2 first, image 0 rank 2; t1 [.1,.1,.8] -> image0 rank 2 (tie
    # with image 1, image 1 ranked first); t2 [.8,.2,.7] -> image1 rank 2; t3 [0,.3,.6] -> image1 rank 1;
    # t4 [0,0,.5] -> rank 0; t5 [0,0,.4] -> rank 0
    assert rec.ir_r1 == pytest.approx(100 * 2 / 6)
    assert rec.ir_r5 == pytest.approx(100.0)
    assert rec.r_mean == pytest.approx((100 / 3 + 100 + 100 + 100 * 2 / 6 + 100 + 100) / 6)
    assert_recall_equal(rec, brute_recall(s, img2txt, txt2img))


def test_ties_rank_higher_index_first() -> None:
    img2txt, txt2img = gt_from_counts([2, 2, 2])
    s = np.zeros((3, 6))
    # every row is all ties: the order is 5,4,3,2,1,0 (texts) and 2,1,0 (images)
    rec = recall_metrics(s, img2txt, txt2img)
    # TR ranks: image0 best of {0,1} = position of 1 = 4; image1 {2,3} -> 2; image2 {4,5} -> 0
    assert (rec.tr_r1, rec.tr_r5) == (pytest.approx(100 / 3), pytest.approx(100.0))
    # IR ranks: texts of image0 -> 2, image1 -> 1, image2 -> 0
    assert rec.ir_r1 == pytest.approx(100 * 2 / 6)
    assert list(ranks_of(s.T, np.arange(6), np.array(txt2img))) == [2, 2, 1, 1, 0, 0]
    assert list(ranking(np.zeros(4))) == [3, 2, 1, 0]
    row = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])  # a tie straddling the top-2 boundary
    assert topk_indices(row, 2).tolist() == [[3, 2]] and topk_indices(row, 9).tolist() == [[3, 2, 1, 0, 4]]
    assert_recall_equal(rec, brute_recall(s, img2txt, txt2img))


def test_rank_beyond_ten_and_image_without_captions() -> None:
    img2txt, txt2img = gt_from_counts([1, 0, 13])
    n_t = len(txt2img)
    s = np.arange(3 * n_t, dtype=np.float64).reshape(3, n_t)  # rows ascending: last text ranks first
    rec = recall_metrics(s, img2txt, txt2img)
    # image 0: its caption 0 is last of 14 -> rank 13 (miss); image 1 has no caption -> miss; image 2: caption 13 -> 0
    assert rec.tr_r1 == rec.tr_r10 == pytest.approx(100 / 3)
    assert_recall_equal(rec, brute_recall(s, img2txt, txt2img))


@pytest.mark.parametrize("seed", range(12))
def test_recall_matches_brute_force_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_i = int(rng.integers(1, 25))
    counts = rng.integers(1, 6, size=n_i)
    img2txt, txt2img = gt_from_counts(counts)
    n_t = len(txt2img)
    kind = seed % 3
    if kind == 0:
        s = rng.normal(size=(n_i, n_t))
    elif kind == 1:
        s = rng.integers(0, 3, size=(n_i, n_t)).astype(np.float32)  # many ties
    else:  # rerank-like: a few candidates, the rest -100
        s = np.full((n_i, n_t), NON_CANDIDATE)
        mask = rng.random((n_i, n_t)) < 0.3
        s[mask] = rng.normal(size=int(mask.sum()))
    s_t2i = None
    if seed % 2:  # a separate text->image matrix, as rerank produces
        s_t2i = np.where(rng.random((n_t, n_i)) < 0.5, rng.normal(size=(n_t, n_i)), NON_CANDIDATE)
    rec = recall_metrics(s, img2txt, txt2img, s_t2i)
    assert_recall_equal(rec, brute_recall(s, img2txt, txt2img, s_t2i))
    k = int(rng.integers(1, n_t + 2))
    top = topk_indices(s, k)
    for i in range(n_i):
        assert list(top[i]) == list(ranking(s[i])[:k])


def test_recall_rejects_bad_input() -> None:
    img2txt, txt2img = gt_from_counts([1, 1])
    with pytest.raises(InvalidInputError, match="NaN"):
        recall_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), img2txt, txt2img)
    with pytest.raises(InvalidInputError, match="img2txt"):
        recall_metrics(np.zeros((3, 2)), img2txt, txt2img)
    with pytest.raises(InvalidInputError, match="scores_t2i"):
        recall_metrics(np.zeros((2, 2)), img2txt, txt2img, np.zeros((3, 2)))
    with pytest.raises(InvalidInputError, match="txt2img"):
        recall_metrics(np.zeros((2, 2)), img2txt, [0, 5])


@pytest.mark.parametrize("seed", range(4))
def test_group_accuracy_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_i = 10
    img2txt, txt2img = gt_from_counts(rng.integers(1, 4, size=n_i))
    groups = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]  # group 2 has one image: skipped
    s = rng.integers(0, 4, size=(n_i, len(txt2img))).astype(np.float64)
    s_t2i = rng.integers(0, 4, size=(len(txt2img), n_i)).astype(np.float64)
    got = group_accuracy(s, img2txt, txt2img, groups, s_t2i)
    assert got is not None and got.groups == 3
    annotated = np.zeros((len(txt2img), n_i), dtype=bool)
    annotated[np.arange(len(txt2img)), txt2img] = True  # without objects, true = the annotated image
    want = brute_group(s, s_t2i, img2txt, groups, annotated)
    assert (got.t2i, got.t2i_chance, got.i2t, got.i2t_chance) == pytest.approx(want)
    assert group_accuracy(s, img2txt, txt2img, list(range(n_i)), s_t2i) is None


@pytest.mark.parametrize("seed", range(4))
def test_group_accuracy_with_truth_matches_brute_force(seed: int) -> None:
    """A pick is right when the caption is true of the picked image (siblings share true captions)."""
    rng = np.random.default_rng(200 + seed)
    n_i = 10
    img2txt, txt2img = gt_from_counts(rng.integers(1, 4, size=n_i))
    groups = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    n_t = len(txt2img)
    true = rng.random((n_t, n_i)) < 0.35
    true[np.arange(n_t), txt2img] = True  # a caption is true of its own image
    s = rng.integers(0, 4, size=(n_i, n_t)).astype(np.float64)
    s_t2i = rng.integers(0, 4, size=(n_t, n_i)).astype(np.float64)
    got = group_accuracy(s, img2txt, txt2img, groups, s_t2i, truth=lambda t, i: bool(true[t, i]))
    assert got is not None
    want = brute_group(s, s_t2i, img2txt, groups, true)
    assert (got.t2i, got.t2i_chance, got.i2t, got.i2t_chance) == pytest.approx(want)
    # a sibling that makes the caption true is a right pick, not an error as under the annotation rule
    plain = group_accuracy(s, img2txt, txt2img, groups, s_t2i)
    assert plain is not None and (got.t2i, got.i2t) != (plain.t2i, plain.i2t)
    # choices where every option is true decide nothing and are skipped (the annotation rule has none)
    assert got.texts < plain.texts


def test_group_accuracy_perfect_scores() -> None:
    img2txt, txt2img = gt_from_counts([2, 2, 2, 2])
    s = np.full((4, 8), -1.0)
    for i, caps in enumerate(img2txt):
        s[i, caps] = 1.0
    got = group_accuracy(s, img2txt, txt2img, [0, 0, 1, 1])
    assert got is not None
    assert (got.t2i, got.i2t, got.t2i_chance, got.i2t_chance) == (1.0, 1.0, 0.5, 0.5)


# ------------------------------------------------------------------------------------ truth-aware recall


def test_truth_recall_hand_built() -> None:
    from alignfuse.evaluation import truth_recall_metrics

    # 2 images x 4 texts; text 1 (caption of image 0) is also true of image 1, text 3 of image 0
    img2txt, txt2img = gt_from_counts([2, 2])
    true = np.zeros((4, 2), dtype=bool)
    true[[0, 1], 0] = True
    true[[2, 3], 1] = True
    true[1, 1] = true[3, 0] = True
    s = np.array([[0.1, 0.2, 0.9, 0.3], [0.8, 0.7, 0.1, 0.2]])  # image 0 ranks text 2 first (false of it)
    proto = recall_metrics(s, img2txt, txt2img)
    rec = truth_recall_metrics(s, lambda t, i: bool(true[t, i]))
    # TR: image 0 -> [2, 3, 1, 0]: text 3 true (rank 1); image 1 -> [0, 1, 3, 2]: text 1 true (rank 1)
    assert proto.tr_r1 == 0.0 and rec.tr_r1 == 0.0 and rec.tr_r5 == 100.0
    # IR: text 0 -> image 1 first (false): miss at 1; text 1 -> image 1 first, true: hit though not its own
    # image; text 2 -> image 0 first: miss; text 3 -> image 0 first, true: hit
    assert proto.ir_r1 == 0.0
    assert rec.ir_r1 == pytest.approx(50.0)
    assert rec.ir_r5 == 100.0
    assert rec.r_mean == pytest.approx((0 + 100 + 100 + 50 + 100 + 100) / 6)


@pytest.mark.parametrize("seed", range(12))
def test_truth_recall_matches_brute_force_and_bounds_albef(seed: int) -> None:
    from alignfuse.evaluation import TRUTH_RECALL_KEYS, truth_recall_metrics

    from .reference import as_dict, brute_truth_recall

    rng = np.random.default_rng(seed)
    n_i = int(rng.integers(2, 30))
    counts = rng.integers(0 if seed % 3 == 0 else 1, 4, size=n_i)
    if counts.sum() == 0:
        counts[0] = 1
    img2txt, txt2img = gt_from_counts(counts)
    n_t = len(txt2img)
    # quantised scores: plenty of ties exercise the tie rule; non-candidates at -100 as the rerank makes them
    s_i2t = rng.integers(0, 4, size=(n_i, n_t)).astype(np.float64)
    s_i2t[rng.random(size=s_i2t.shape) < 0.3] = NON_CANDIDATE
    s_t2i = rng.integers(0, 4, size=(n_t, n_i)).astype(np.float64) if seed % 2 else None
    true = rng.random(size=(n_t, n_i)) < 0.15
    true[np.arange(n_t), txt2img] = True  # annotated pairs are true
    rec = truth_recall_metrics(s_i2t, lambda t, i: bool(true[t, i]), s_t2i)
    want = brute_truth_recall(s_i2t, true, s_t2i)
    got = dict(zip(TRUTH_RECALL_KEYS, as_dict(rec).values(), strict=True))
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-9), (key, got, want)
    proto = as_dict(recall_metrics(s_i2t, img2txt, txt2img, s_t2i))
    for key, v in proto.items():
        assert got[f"{key}_true"] >= v - 1e-9, key
    # truth = the annotation only: truth-aware recall equals ALBEF's (images without captions aside)
    only = truth_recall_metrics(s_i2t, lambda t, i: txt2img[t] == i, s_t2i)
    if counts.min() > 0:
        assert_recall_equal(only, proto)


def test_truth_ranks_depth_and_errors() -> None:
    from alignfuse.evaluation import truth_ranks

    s = np.array([[3.0, 2.0, 1.0, 0.0]])
    assert truth_ranks(s, lambda r, c: c == 3, depth=4)[0] == 3.0
    assert np.isinf(truth_ranks(s, lambda r, c: c == 3, depth=3)[0])
    with pytest.raises(InvalidInputError):
        truth_ranks(s, lambda r, c: True, depth=0)
    with pytest.raises(InvalidInputError):
        truth_ranks(np.array([[np.nan]]), lambda r, c: True)
