"""Retrieval metrics with ALBEF's protocol (numpy only, no models): recall, ranks, top-k, group accuracy.

Recall
------
:func:`recall_metrics` takes an image→text score matrix ``S[n_images, n_texts]`` (and optionally a separate
text→image matrix ``S_t2i[n_texts, n_images]``, as ALBEF's rerank produces two) plus the ground truth
(``img2txt[i]`` = the captions of image ``i``, ``txt2img[t]`` = the image of caption ``t``) and returns exactly
ALBEF's numbers (``itm_eval`` in its ``Retrieval.py``):

- TR R@K (image→text): for each image, the 0-based rank of the *best-ranked* of its ground-truth captions in
  its row; R@K = 100 · fraction of images whose rank < K. An image without captions counts as a miss.
- IR R@K (text→image): for each text, the 0-based rank of its one image in its row.
- ``r_mean`` = the mean of the six recalls.

Ranking and ties (a deterministic rule)
---------------------------------------
ALBEF ranks a row with ``np.argsort(score)[::-1]``. We define the order as that expression with a *stable*
sort: scores descending, and **among equal scores the higher index ranks first** (the reverse of a stable
ascending sort). So the rank of column ``j`` in row ``s`` is ``#{k: s[k] > s[j]} + #{k > j: s[k] == s[j]}``;
it is computed by counting (no sort). This equals ALBEF's result whenever numpy's default (unstable)
quicksort happens to keep equal scores in index order, which it does for short rows. It matters for the
non-candidates of the rerank mode, which all score −100. NaN scores are rejected.

Hard-negative groups (:func:`group_accuracy`): when the Karpathy JSON has a ``group`` per image (the built-in
scenes), for each text: is its own image ranked first among the images of its group (``t2i``); for each
image: is the best-ranked caption among the group's captions one of its own (``i2t``). Groups with one image
are skipped. Chance = mean of 1/|group| (t2i) and of own captions / group captions (i2t). Given a ``truth(t,
i)`` (the evaluation builds one from the caller's truth function when every image lists its drawn
``objects``, as the scenes do), a pick is judged by whether the caption is *true* of the picked image: t2i =
does the best group image make the caption true, i2t = is the best group caption true of the image; choices
where every option is true are skipped and chance is the true fraction of the options.

Truth-aware recall (:func:`truth_recall_metrics`): ALBEF's R@K counts only the annotated pairs, while many
captions of the scenes are true of other images too ("a red circle"). Given ``truth(t, i)`` (which must hold
for every annotated pair, as :meth:`~.data.EvalData.pair_truth` does), IR R@K counts a text as a hit when one
of its top-K images (same ranking and tie rule as above) makes it true, TR R@K an image when one of its top-K
captions is true of it. Since every annotated pair is true, each truth-aware R@K >= ALBEF's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from alignfuse.errors import InvalidInputError

RECALL_KEYS: tuple[str, ...] = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
#: the truth-aware recall's keys in the eval JSON, next to ALBEF's (:func:`truth_recall_metrics`)
TRUTH_RECALL_KEYS: tuple[str, ...] = tuple(f"{k}_true" for k in RECALL_KEYS)
#: how deep the truth-aware ranks look (the largest K reported)
TRUTH_DEPTH = 10

#: ``truth(t, i)``: whether text ``t`` is true of image ``i`` (indices into the score matrix)
PairTruth = Callable[[int, int], bool]


@dataclass(frozen=True)
class Recall:
    """ALBEF's retrieval metrics, in percent."""

    tr_r1: float
    tr_r5: float
    tr_r10: float
    ir_r1: float
    ir_r5: float
    ir_r10: float
    r_mean: float


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D score matrix, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise InvalidInputError(f"{name} contains NaN scores")
    return s


def ranks_of(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """0-based rank of ``scores[rows[p], cols[p]]`` within row ``rows[p]``, for every p (int64 [P]).

    Order: scores descending; among equal scores the higher column index first (reverse stable argsort,
    see the module docstring)."""
    s = np.asarray(scores)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    cols = np.asarray(cols, dtype=np.int64).reshape(-1)
    out = np.empty(len(rows), dtype=np.int64)
    if len(rows) == 0:
        return out
    col_index = np.arange(s.shape[1], dtype=np.int64)[None, :]
    for a in range(0, len(rows), chunk):
        r = rows[a : a + chunk]
        c = cols[a : a + chunk]
        block = s[r]  # [b, n]
        target = block[np.arange(len(r)), c][:, None]
        greater = (block > target).sum(axis=1)
        tied_after = ((block == target) & (col_index > c[:, None])).sum(axis=1)
        out[a : a + chunk] = greater + tied_after
    return out


def ranking(row: np.ndarray) -> np.ndarray:
    """The full order of one row under the same rule: indices, best first (``argsort(stable)[::-1]``)."""
    return np.argsort(np.asarray(row), kind="stable")[::-1]


def topk_indices(scores: np.ndarray, k: int, *, chunk: int = 512) -> np.ndarray:
    """Per row, the first ``k`` indices of :func:`ranking` (int64 [n, min(k, m)]).

    ``np.argpartition`` selects the k largest; a row where the k-th value is tied with a value left outside
    falls back to the full stable sort, so the result is exactly ``ranking(row)[:k]``."""
    s = np.asarray(scores)
    n, m = s.shape
    k = min(k, m)
    out = np.empty((n, k), dtype=np.int64)
    if k == 0:
        return out
    for a in range(0, n, chunk):
        block = s[a : a + chunk]
        if k >= m:
            out[a : a + chunk] = np.argsort(block, axis=1, kind="stable")[:, ::-1][:, :k]
            continue
        part = np.argpartition(block, m - k, axis=1)[:, m - k :]
        vals = np.take_along_axis(block, part, axis=1)
        thr = vals.min(axis=1, keepdims=True)
        ambiguous = (block == thr).sum(axis=1) != (vals == thr).sum(axis=1)
        order = np.lexsort((-part, -vals), axis=-1)  # value descending, then index descending
        out[a : a + chunk] = np.take_along_axis(part, order, axis=1)
        for r in np.nonzero(ambiguous)[0]:
            out[a + r] = ranking(block[r])[:k]
    return out


def _normalise_gt(
    n_images: int, n_texts: int, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int] | np.ndarray
) -> tuple[list[list[int]], np.ndarray]:
    if len(img2txt) != n_images:
        raise InvalidInputError(
            f"img2txt has {len(img2txt)} entries but the score matrix has {n_images} images"
        )
    t2i = np.asarray(txt2img, dtype=np.int64).reshape(-1)
    if len(t2i) != n_texts:
        raise InvalidInputError(f"txt2img has {len(t2i)} entries but the score matrix has {n_texts} texts")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise InvalidInputError("txt2img names an image index outside the score matrix")
    i2t = [[int(t) for t in caps] for caps in img2txt]
    for caps in i2t:
        for t in caps:
            if not 0 <= t < n_texts:
                raise InvalidInputError(f"img2txt names text index {t} outside the score matrix")
    return i2t, t2i


def ranks_i2t(scores_i2t: np.ndarray, img2txt: Sequence[Sequence[int]]) -> np.ndarray:
    """Per image, the rank of its best-ranked ground-truth caption (float [N_i]; ``inf`` without captions)."""
    s = _check_scores(scores_i2t, "scores_i2t")
    img_of_pair = np.asarray([i for i, caps in enumerate(img2txt) for _ in caps], dtype=np.int64)
    cap_of_pair = np.asarray([t for caps in img2txt for t in caps], dtype=np.int64)
    best = np.full(s.shape[0], np.inf)
    if len(img_of_pair):
        r = ranks_of(s, img_of_pair, cap_of_pair)
        np.minimum.at(best, img_of_pair, r.astype(np.float64))
    return best


def ranks_t2i(scores_t2i: np.ndarray, txt2img: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per text, the rank of its image (int64 [N_t])."""
    s = _check_scores(scores_t2i, "scores_t2i")
    t2i = np.asarray(txt2img, dtype=np.int64).reshape(-1)
    return ranks_of(s, np.arange(s.shape[0], dtype=np.int64), t2i)


def _pct(ranks: np.ndarray, k: int) -> float:
    return 100.0 * float(np.mean(ranks < k)) if len(ranks) else 0.0


def _score_pair(scores_i2t: np.ndarray, scores_t2i: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The checked image→text matrix [n_i, n_t] and text→image matrix [n_t, n_i] (its transpose when None)."""
    s_i2t = _check_scores(scores_i2t, "scores_i2t")
    s_t2i = s_i2t.T if scores_t2i is None else _check_scores(scores_t2i, "scores_t2i")
    n_i, n_t = s_i2t.shape
    if s_t2i.shape != (n_t, n_i):
        raise InvalidInputError(f"scores_t2i has shape {s_t2i.shape}, expected {(n_t, n_i)}")
    return s_i2t, s_t2i


def _recall(tr: np.ndarray, ir: np.ndarray) -> Recall:
    """R@1/5/10 both ways and their mean from the 0-based ranks of the first hit (inf: no hit)."""
    vals = [_pct(tr, 1), _pct(tr, 5), _pct(tr, 10), _pct(ir, 1), _pct(ir, 5), _pct(ir, 10)]
    return Recall(
        tr_r1=vals[0],
        tr_r5=vals[1],
        tr_r10=vals[2],
        ir_r1=vals[3],
        ir_r5=vals[4],
        ir_r10=vals[5],
        r_mean=float(np.mean(vals)),
    )


def recall_metrics(
    scores_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | np.ndarray,
    scores_t2i: np.ndarray | None = None,
) -> Recall:
    """ALBEF's TR/IR R@1/5/10 and r_mean (percent) from ``scores_i2t[N_i, N_t]`` (and ``scores_t2i[N_t, N_i]``,
    default ``scores_i2t.T``). See the module docstring for the tie rule."""
    s_i2t, s_t2i = _score_pair(scores_i2t, scores_t2i)
    n_i, n_t = s_i2t.shape
    i2t, t2i = _normalise_gt(n_i, n_t, img2txt, txt2img)
    tr = ranks_i2t(s_i2t, i2t)
    ir = ranks_t2i(s_t2i, t2i)
    return _recall(tr, ir)


@dataclass(frozen=True)
class GroupAccuracy:
    """Hard-negative accuracy within groups (fractions in [0, 1]) and its chance level."""

    t2i: float
    t2i_chance: float
    i2t: float
    i2t_chance: float
    groups: int
    texts: int
    images: int


def group_accuracy(
    scores_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | np.ndarray,
    groups: Sequence[int | None],
    scores_t2i: np.ndarray | None = None,
    truth: Callable[[int, int], bool] | None = None,
) -> GroupAccuracy | None:
    """Accuracy of picking the right item among a group's hard negatives (see the module docstring).

    ``groups[i]`` is the group of image ``i`` (None: no group). Returns None when no group has 2+ images.

    ``truth(t, i)``: whether text ``t`` is true of image ``i`` (the scenes know: their JSON lists the drawn
    objects). With it, a pick is right when the chosen item makes the caption true rather than when it is the
    annotated one: siblings often share a true caption ("a red circle"), and counting those picks as errors
    measures annotation, not binding. Captions true of every group image (t2i) and images of which every
    group caption is true (i2t) decide nothing and are skipped; chance is the true fraction of the choices."""
    s_i2t = _check_scores(scores_i2t, "scores_i2t")
    s_t2i = s_i2t.T if scores_t2i is None else _check_scores(scores_t2i, "scores_t2i")
    n_i, n_t = s_i2t.shape
    i2t, t2i = _normalise_gt(n_i, n_t, img2txt, txt2img)
    if len(groups) != n_i:
        raise InvalidInputError(f"groups has {len(groups)} entries, expected {n_i}")
    # without drawn objects a caption counts as true of its annotated image only
    is_true = truth if truth is not None else (lambda t, i: int(t2i[t]) == i)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            members.setdefault(int(g), []).append(i)
    t_hits: list[float] = []
    t_chance: list[float] = []
    i_hits: list[float] = []
    i_chance: list[float] = []
    used = 0
    for imgs in members.values():
        if len(imgs) < 2:
            continue
        used += 1
        g_imgs = np.asarray(imgs, dtype=np.int64)  # ascending: local order = global order (same tie rule)
        caps = np.asarray(sorted(t for i in imgs for t in i2t[i]), dtype=np.int64)
        for i in imgs:
            for t in i2t[i]:
                true_of = [is_true(t, int(j)) for j in g_imgs]
                if all(true_of):
                    continue
                t_hits.append(float(true_of[int(ranking(s_t2i[t, g_imgs])[0])]))
                t_chance.append(sum(true_of) / len(true_of))
            if len(caps) and i2t[i]:
                true_caps = [is_true(int(c), i) for c in caps]
                if all(true_caps):
                    continue
                i_hits.append(float(true_caps[int(ranking(s_i2t[i, caps])[0])]))
                i_chance.append(sum(true_caps) / len(caps))
    if used == 0:
        return None
    return GroupAccuracy(
        t2i=float(np.mean(t_hits)) if t_hits else 0.0,
        t2i_chance=float(np.mean(t_chance)) if t_chance else 0.0,
        i2t=float(np.mean(i_hits)) if i_hits else 0.0,
        i2t_chance=float(np.mean(i_chance)) if i_chance else 0.0,
        groups=used,
        texts=len(t_hits),
        images=len(i_hits),
    )


def truth_ranks(scores: np.ndarray, is_true: PairTruth, depth: int = TRUTH_DEPTH) -> np.ndarray:
    """Per row ``r``, the 0-based rank (same order as :func:`ranking`) of the best-ranked column ``c`` with
    ``is_true(r, c)``, looking at the first ``depth`` columns only (float [n]; ``inf`` when none is true there)."""
    s = _check_scores(scores, "scores")
    if depth < 1:
        raise InvalidInputError(f"depth must be >= 1, got {depth}")
    top = topk_indices(s, depth)
    out = np.full(s.shape[0], np.inf)
    for r in range(s.shape[0]):
        for j, c in enumerate(top[r]):
            if is_true(r, int(c)):
                out[r] = float(j)
                break
    return out


def truth_recall_metrics(
    scores_i2t: np.ndarray,
    truth: PairTruth,
    scores_t2i: np.ndarray | None = None,
) -> Recall:
    """Truth-aware TR/IR R@1/5/10 and their mean (percent; see the module docstring). ``truth(t, i)``: text
    ``t`` is true of image ``i``; it must hold for the annotated pairs for the result to bound ALBEF's from above."""
    s_i2t, s_t2i = _score_pair(scores_i2t, scores_t2i)
    n_i, n_t = s_i2t.shape
    tr = truth_ranks(s_i2t, lambda i, t: truth(t, i)) if n_t else np.full(n_i, np.inf)
    ir = truth_ranks(s_t2i, truth) if n_i else np.full(n_t, np.inf)
    return _recall(tr, ir)
