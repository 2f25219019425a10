"""ALBEF-protocol evaluation: recall metrics against a brute-force implementation, the three modes, the CLI."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignfuse.data.scenes import SceneObject, caption_matches
from alignfuse.errors import CorruptDataError, InvalidInputError, NotFoundError
from alignfuse.evaluation.protocol import (
    GROUP_KEYS,
    MODE_KEYS,
    NON_CANDIDATE,
    evaluate,
    group_accuracy,
    load_eval_data,
    ranking,
    ranks_of,
    recall_metrics,
    topk_indices,
)
from alignfuse.models.base import ImageStates, MatchScores, ModelInfo, Preprocess, TextStates

# ------------------------------------------------------------------------------------ brute-force reference


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


# ------------------------------------------------------------------------------------------ recall metrics


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
    assert plain is not None and got.t2i >= 0 and (got.t2i, got.i2t) != (plain.t2i, plain.i2t)


def test_group_accuracy_perfect_scores() -> None:
    img2txt, txt2img = gt_from_counts([2, 2, 2, 2])
    s = np.full((4, 8), -1.0)
    for i, caps in enumerate(img2txt):
        s[i, caps] = 1.0
    got = group_accuracy(s, img2txt, txt2img, [0, 0, 1, 1])
    assert got is not None
    assert (got.t2i, got.i2t, got.t2i_chance, got.i2t_chance) == (1.0, 1.0, 0.5, 0.5)


# -------------------------------------------------------------------------------------------- data loading


def test_load_eval_data_layouts(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    # ALBEF train-style: one caption string per record, repeated image -> merged in order
    (tmp_path / "split.json").write_text(
        json.dumps(
            [
                {"image": "a.jpg", "caption": "one"},
                {"image": "b.jpg", "caption": ["two", "three"]},
                {"image": "a.jpg", "caption": "four"},
            ]
        )
    )
    d = load_eval_data(tmp_path / "split.json")
    assert d.images == ("a.jpg", "b.jpg") and d.texts == ("one", "four", "two", "three")
    assert d.txt2img == (0, 0, 1, 1) and d.img2txt == ((0, 1), (2, 3)) and d.groups is None
    assert d.image_paths[0] == tmp_path / "a.jpg"
    assert load_eval_data(tmp_path / "split.json", limit=1).texts == ("one", "four")
    # Karpathy's original dataset_*.json, filtered to the test split
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "images": [
                    {"filepath": "", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
                    {
                        "filepath": "",
                        "filename": "b.jpg",
                        "split": "test",
                        "sentences": [{"raw": "y"}, {"raw": "z"}],
                    },
                ]
            }
        )
    )
    d2 = load_eval_data(tmp_path / "dataset.json")
    assert d2.images == ("b.jpg",) and d2.texts == ("y", "z")
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(CorruptDataError):
        load_eval_data(tmp_path / "bad.json")
    with pytest.raises(NotFoundError):
        load_eval_data(tmp_path / "missing.json")
    with pytest.raises(InvalidInputError, match="limit"):
        load_eval_data(tmp_path / "split.json", limit=0)


# ---------------------------------------------------------------------------------------------- the modes


class FakeCross:
    """A small deterministic CrossEncoder: the "match" logit of (image, text) is <h(text), v(image)>, with h a
    hash-seeded vector per text and v the 2x2 mean colour grid of the image. Text batches pad to their longest
    text, so concatenating batches is exercised."""

    def __init__(self) -> None:
        pre = Preprocess(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.info = ModelInfo("fake:cross", "fake", "fake", "random-init", "f" * 64, 0, pre)
        self.device = torch.device("cpu")
        self.score_calls = 0
        self.pairs_scored = 0

    @property
    def image_transform(self):  # type: ignore[no-untyped-def]
        def tf(im: Image.Image) -> torch.Tensor:
            arr = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

        return tf

    @staticmethod
    def text_vector(text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).normal(size=12).astype(np.float32)

    def text_states(self, texts: Sequence[str]) -> TextStates:
        width = max(len(t.split()) for t in texts) + 1
        hidden = torch.zeros(len(texts), width, 12)
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        for n, t in enumerate(texts):
            hidden[n, 0] = torch.from_numpy(self.text_vector(t))
            mask[n, : len(t.split()) + 1] = 1
        return TextStates(ids=mask.clone(), mask=mask, hidden=hidden)

    def image_states(self, pixels: torch.Tensor) -> ImageStates:
        grid = torch.nn.functional.adaptive_avg_pool2d(pixels, 2)  # [n, 3, 2, 2]
        return ImageStates(tokens=grid.reshape(len(pixels), 1, 12))

    def image_states_from_tokens(self, tokens: torch.Tensor) -> ImageStates:
        return ImageStates(tokens=tokens.float())

    def score(self, text: TextStates, images: ImageStates) -> MatchScores:
        assert text.hidden is not None
        self.score_calls += 1
        logit = (text.hidden[:, 0, :] * images.tokens[:, 0, :]).sum(-1)
        self.pairs_scored += int(logit.shape[0])
        return MatchScores(logit=logit.numpy().astype(np.float32), prob=torch.sigmoid(logit).numpy())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignfuse.data.scenes import generate_scenes

    return generate_scenes(tmp_path_factory.mktemp("scenes"), seed=5, count=12, split="test", size=64)


@pytest.fixture(scope="module")
def dual():  # type: ignore[no-untyped-def]
    from alignfuse.models.registry import create_dual_encoder

    torch.set_num_threads(1)
    return create_dual_encoder("alignfuse:random-tiny")


def expected_matrices(data, dual, cross: FakeCross, k: int, fusion: str):  # type: ignore[no-untyped-def]
    """The rerank score matrices computed independently (loops, one encoder call per side)."""
    with torch.inference_mode():
        pix = torch.stack([dual.image_transform(Image.open(p).convert("RGB")) for p in data.image_paths])
        sims = dual.encode_images(pix) @ dual.encode_texts(list(data.texts)).T
    v = np.stack(
        [
            cross.image_states(cross.image_transform(Image.open(p).convert("RGB"))[None]).tokens[0, 0].numpy()
            for p in data.image_paths
        ]
    )
    h = np.stack([cross.text_vector(t) for t in data.texts])
    f = v.astype(np.float64) @ h.T.astype(np.float64)
    if fusion == "itm+itc":
        f = f + sims
    if fusion == "itm+itc_logit":
        f = f + sims * dual.info.itc_logit_scale
    n_i, n_t = sims.shape
    s_i2t = np.full((n_i, n_t), NON_CANDIDATE)
    s_t2i = np.full((n_t, n_i), NON_CANDIDATE)
    pairs = set()
    for i in range(n_i):
        for t in ranking(sims[i])[:k]:
            s_i2t[i, t] = f[i, t]
            pairs.add((i, int(t)))
    for t in range(n_t):
        for i in ranking(sims[:, t])[:k]:
            s_t2i[t, i] = f[i, t]
            pairs.add((int(i), t))
    return sims, f, s_i2t, s_t2i, pairs


def test_logit_fusion_needs_a_dual_encoder_with_a_logit_scale(scenes: Path, dual) -> None:  # type: ignore[no-untyped-def]
    assert dual.info.itc_logit_scale is not None and dual.info.itc_logit_scale > 1
    saved = dual.info
    dual.info = replace(saved, itc_logit_scale=None)
    try:
        with pytest.raises(InvalidInputError, match="itm\\+itc_logit"):
            evaluate(None, scenes, None, dual, FakeCross(), ["rerank"], 3, 64, fusion="itm+itc_logit")
    finally:
        dual.info = saved


@pytest.mark.parametrize(("k", "fusion"), [(3, "itm"), (5, "itm+itc"), (4, "itm+itc_logit")])
def test_rerank_matches_independent_computation(scenes: Path, dual, k: int, fusion: str) -> None:  # type: ignore[no-untyped-def]
    cross = FakeCross()
    report = evaluate(None, scenes, None, dual, cross, ["dual", "rerank"], k, 64, fusion=fusion)
    data = load_eval_data(scenes)
    sims, _f, s_i2t, s_t2i, pairs = expected_matrices(data, dual, cross, k, fusion)
    n_i, n_t = sims.shape
    assert (report.meta.n_images, report.meta.n_texts) == (12, 60)
    rr = report.result("rerank")
    assert_recall_equal(rr.recall, brute_recall(s_i2t, data.img2txt, data.txt2img, s_t2i))
    assert_recall_equal(report.result("dual").recall, brute_recall(sims, data.img2txt, data.txt2img))
    # pairs scored once each; protocol count is k·(N_i + N_t)
    assert rr.pair_evals == len(pairs) == cross.pairs_scored - 1  # + one untimed warm-up pair
    assert rr.pair_evals < k * (n_i + n_t) == report.meta.pair_evals_protocol["rerank"]
    assert rr.encoder_passes == (n_i + n_t) * 2
    assert report.result("dual").encoder_passes == n_i + n_t and report.result("dual").pair_evals == 0
    assert report.meta.embeddings == "encoded" and report.meta.encoded_now == n_i + n_t
    # the scenes JSON has groups and drawn objects: hard-negative accuracy is reported, computed on the same
    # matrices, judging a pick by whether the caption is true of the picked image
    assert data.groups is not None and data.objects is not None
    truth = data.truth()
    assert truth is not None
    objs = [[SceneObject(**o) for o in per] for per in data.objects]
    for t in range(0, n_t, 7):
        for i in range(n_i):
            assert truth(t, i) == (data.txt2img[t] == i or caption_matches(data.texts[t], objs[i]))
    assert all(truth(t, data.txt2img[t]) for t in range(n_t))
    want_g = group_accuracy(s_i2t, data.img2txt, data.txt2img, data.groups, s_t2i, truth=truth)
    assert rr.group is not None and want_g is not None
    assert (rr.group.t2i, rr.group.i2t, rr.group.t2i_chance) == pytest.approx(
        (want_g.t2i, want_g.i2t, want_g.t2i_chance)
    )
    assert 0 < rr.group.t2i_chance < 1


def test_rerank_with_k_at_least_n_equals_all_pairs(scenes: Path, dual) -> None:  # type: ignore[no-untyped-def]
    cross = FakeCross()
    report = evaluate(None, scenes, None, dual, cross, ["rerank", "all_pairs"], 1000, 7)
    rr, ap = report.result("rerank").to_json(), report.result("all_pairs").to_json()
    for key in rr:
        if key not in ("seconds", "encoder_passes"):
            assert rr[key] == ap[key], key
    assert ap["pair_evals"] == 12 * 60 and ap["encoder_passes"] == 72
    data = load_eval_data(scenes)
    _sims, f, _a, _b, _p = expected_matrices(data, dual, cross, 1000, "itm")
    assert_recall_equal(report.result("all_pairs").recall, brute_recall(f, data.img2txt, data.txt2img))


def test_evaluate_argument_errors(scenes: Path, dual) -> None:  # type: ignore[no-untyped-def]
    cross = FakeCross()
    with pytest.raises(InvalidInputError, match="over the cap"):
        evaluate(None, scenes, None, dual, cross, ["all_pairs"], 4, 8, max_all_pairs=100)
    with pytest.raises(InvalidInputError, match="needs a cross-encoder"):
        evaluate(None, scenes, None, dual, None, ["rerank"], 4, 8)
    with pytest.raises(InvalidInputError, match="unknown mode"):
        evaluate(None, scenes, None, dual, cross, ["bogus"], 4, 8)
    with pytest.raises(InvalidInputError, match="k_test"):
        evaluate(None, scenes, None, dual, cross, ["rerank"], 0, 8)
    with pytest.raises(InvalidInputError, match="fusion"):
        evaluate(None, scenes, None, dual, cross, ["rerank"], 4, 8, fusion="sum")
    assert cross.score_calls == 0
    report = evaluate(None, scenes, None, dual, cross, ["all_pairs"], 4, 8, limit=3)
    assert (report.meta.n_images, report.result("all_pairs").pair_evals) == (3, 3 * 15)


# ----------------------------------------------------------------------------- end to end: real models, CLI


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    from alignfuse.service.cli import main

    monkeypatch.setattr(sys, "argv", ["alignfuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--k-test", "0"], "--k-test"),
        (["--modes", "dual,nope"], "--modes"),
        (["--fusion", "mean"], "--fusion"),
        (["--batch-size", "0"], "--batch-size"),
        (["--limit", "0"], "--limit"),
        (["--device", "tpu"], "--device"),
        (["--precision", "int3"], "--precision"),
    ],
)
def test_cli_bad_arguments(
    scenes: Path, tmp_path: Path, extra: list[str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    code, out, err = _run_cli(["eval", str(tmp_path), "--karpathy", str(scenes), *extra], monkeypatch, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err


def test_cli_missing_inputs(scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _out, err = _run_cli(
        ["eval", str(tmp_path / "none"), "--karpathy", str(scenes)], monkeypatch, capsys
    )
    assert code == 3 and "COLLECTION" in err
    code, _out, err = _run_cli(
        ["eval", str(tmp_path), "--karpathy", str(tmp_path / "x.json")], monkeypatch, capsys
    )
    assert code == 3 and "--karpathy" in err


@pytest.fixture(scope="module")
def tiny_collection(scenes: Path, dual, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A collection built from the scenes JSON with alignfuse:random-tiny, reranker albef:tiny + feature cache."""
    from alignfuse.index import BuildOptions, build_collection
    from alignfuse.index.sources import KarpathySource
    from alignfuse.models.registry import create_cross_encoder

    cross = create_cross_encoder("albef:tiny")
    path = tmp_path_factory.mktemp("coll") / "c"
    build_collection(
        path,
        KarpathySource(scenes),
        dual,
        options=BuildOptions(batch_size=16, progress=False, rerank_cache=True),
        cross_encoder=cross,
    )
    return path, cross


def test_end_to_end_real_models_reuse_collection(scenes: Path, dual, tiny_collection) -> None:  # type: ignore[no-untyped-def]
    path, cross = tiny_collection
    modes = ["dual", "rerank", "all_pairs"]
    stored = evaluate(path, scenes, None, dual, cross, modes, 4, 16)
    fresh = evaluate(None, scenes, None, dual, cross, modes, 4, 16, use_feature_cache=False)
    # the stored embeddings and cached image tokens were used: nothing was encoded now
    assert stored.meta.embeddings == "collection" and stored.meta.encoded_now == 0
    assert stored.meta.image_states_from_cache == 12
    assert fresh.meta.embeddings == "encoded" and fresh.meta.encoded_now == 72
    assert stored.meta.cross_encoder == cross.info.id and stored.meta.collection == str(path)
    for mode in modes:
        a, b = stored.result(mode), fresh.result(mode)
        assert a.pair_evals == b.pair_evals and a.encoder_passes == b.encoder_passes
        for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
            # fp16 cached tokens vs fp32 fresh ones: recall must agree up to near-ties (at most one item moves)
            assert abs(getattr(a.recall, k) - getattr(b.recall, k)) <= 100 / 60 + 1e-9, (mode, k)
    ap, rr = fresh.result("all_pairs"), fresh.result("rerank")
    assert ap.pair_evals == 720 and 0 < rr.pair_evals <= 4 * 72
    for r in fresh.results:
        assert r.group is not None and r.group.groups == stored.meta.groups > 0


def test_cli_json_keys(scenes: Path, tiny_collection, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    path, _cross = tiny_collection
    args = ["eval", str(path), "--karpathy", str(scenes), "--modes", "dual,rerank,all_pairs", "--k-test", "3"]
    code, out, err = _run_cli([*args, "--json", "--device", "cpu", "--batch-size", "8"], monkeypatch, capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert set(obj) == {"dual", "rerank", "all_pairs", "meta"}
    for mode in ("dual", "rerank", "all_pairs"):
        assert set(obj[mode]) == set(MODE_KEYS) | set(GROUP_KEYS), mode
    assert obj["meta"]["k_test"] == 3 and obj["meta"]["n_images"] == 12 and obj["meta"]["n_texts"] == 60
    assert obj["meta"]["cross_encoder"].startswith("albef:tiny#")  # the manifest's reranker
    assert obj["meta"]["dual_encoder"].startswith("alignfuse:random-tiny#")
    assert obj["all_pairs"]["pair_evals"] == 720 and obj["dual"]["pair_evals"] == 0
    assert obj["meta"]["fusion"] == "itm"  # no --fusion: the reranker's default (ALBEF: the ITM logit)
    code, out, err = _run_cli([*args, "--json", "--fusion", "itm+itc", "--limit", "4"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["meta"]["fusion"] == "itm+itc"
    # the rich table names every mode
    code, out, err = _run_cli([*args, "--limit", "4"], monkeypatch, capsys)
    assert code == 0, err
    assert "all_pairs" in out and "rerank" in out and "r_mean" in out
    # all_pairs over the cap is refused with one line
    code, _out, err = _run_cli([*args, "--max-all-pairs", "10"], monkeypatch, capsys)
    assert code == 2 and "cap" in err
