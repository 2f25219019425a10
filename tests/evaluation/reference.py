"""Brute-force references for the evaluation tests: ALBEF's itm_eval and group accuracy, written the obvious way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest


def brute_recall(
    s_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    s_t2i: np.ndarray | None = None,
) -> dict[str, float]:
    """ALBEF's itm_eval written the obvious way, with argsort made stable (the documented tie rule)."""
    if s_t2i is None:
        s_t2i = s_i2t.T
    tr = []
    for i, row in enumerate(s_i2t):
        order = list(np.argsort(row, kind="stable")[::-1])
        rank = 1e20
        for t in img2txt[i]:
            rank = min(rank, order.index(t))
        tr.append(rank)
    ir = []
    for t, row in enumerate(s_t2i):
        order = list(np.argsort(row, kind="stable")[::-1])
        ir.append(order.index(txt2img[t]))

    def pct(ranks: Sequence[float], k: int) -> float:
        return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)

    vals = {
        "tr_r1": pct(tr, 1),
        "tr_r5": pct(tr, 5),
        "tr_r10": pct(tr, 10),
        "ir_r1": pct(ir, 1),
        "ir_r5": pct(ir, 5),
        "ir_r10": pct(ir, 10),
    }
    vals["r_mean"] = sum(vals.values()) / 6
    return vals


def as_dict(rec: object) -> dict[str, float]:
    return {k: getattr(rec, k) for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")}


def assert_recall_equal(got: object, want: dict[str, float]) -> None:
    g = as_dict(got)
    for k, v in want.items():
        assert g[k] == pytest.approx(v, abs=1e-9), (k, g, want)


def gt_from_counts(counts: Sequence[int] | np.ndarray) -> tuple[list[list[int]], list[int]]:
    img2txt: list[list[int]] = []
    txt2img: list[int] = []
    for i, c in enumerate(counts):
        img2txt.append(list(range(len(txt2img), len(txt2img) + c)))
        txt2img.extend([i] * c)
    return img2txt, txt2img


def brute_group(
    s_i2t: np.ndarray, s_t2i: np.ndarray, img2txt: list[list[int]], groups: list[int], true: np.ndarray
) -> tuple[float, float, float, float]:
    t_hit, t_ch, i_hit, i_ch = [], [], [], []
    for i, g in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == g]
        if len(members) < 2:
            continue
        caps = sorted(c for j in members for c in img2txt[j])
        for t in img2txt[i]:
            if all(true[t, j] for j in members):
                continue
            best = max(members, key=lambda j: (s_t2i[t, j], j))
            t_hit.append(bool(true[t, best]))
            t_ch.append(np.mean([true[t, j] for j in members]))
        if all(true[c, i] for c in caps):
            continue
        top = max(caps, key=lambda c: (s_i2t[i, c], c))
        i_hit.append(bool(true[top, i]))
        i_ch.append(np.mean([true[c, i] for c in caps]))
    return (float(np.mean(t_hit)), float(np.mean(t_ch)), float(np.mean(i_hit)), float(np.mean(i_ch)))


def brute_truth_recall(
    s_i2t: np.ndarray, true: np.ndarray, s_t2i: np.ndarray | None = None
) -> dict[str, float]:
    """Truth-aware R@K the obvious way: ``true[t, i]`` = caption t is true of image i. A text is a hit at K when
    any of its top-K images (full stable ranking) makes it true; an image when any of its top-K captions is
    true of it. Keys with the ``_true`` suffix."""
    if s_t2i is None:
        s_t2i = s_i2t.T

    def hit(order: Sequence[int], ok: Sequence[bool], k: int) -> bool:
        return any(ok[j] for j in order[:k])

    vals: dict[str, float] = {}
    for name, rows, ok in (("tr", s_i2t, true.T), ("ir", s_t2i, true)):
        for k in (1, 5, 10):
            hits = [hit(list(np.argsort(row, kind="stable")[::-1]), ok[r], k) for r, row in enumerate(rows)]
            vals[f"{name}_r{k}_true"] = 100.0 * sum(hits) / len(hits)
    vals["r_mean_true"] = sum(vals.values()) / 6
    return vals


def brute_precision(order: Sequence[str], true_keys: set[str], k: int) -> float:
    """Truth-aware precision@k: the share of the first k keys that are true (k in the denominator)."""
    return sum(1 for key in list(order)[:k] if key in true_keys) / k
