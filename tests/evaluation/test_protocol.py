"""ALBEF-protocol evaluation: the three modes against an independent computation, the truth function, the CLI."""

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
from alignfuse.errors import InvalidInputError
from alignfuse.evaluation import (
    GROUP_KEYS,
    MODE_KEYS,
    NON_CANDIDATE,
    TRUTH_RECALL_KEYS,
    evaluate,
    group_accuracy,
    load_eval_data,
    ranking,
)
from alignfuse.models.base import ImageStates, MatchScores, ModelInfo, Preprocess, TextStates

from .reference import as_dict, assert_recall_equal, brute_recall, brute_truth_recall

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
    report = evaluate(
        None, scenes, None, dual, cross, ["dual", "rerank"], k, 64, fusion=fusion, truth=caption_matches
    )
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
    truth = data.pair_truth(caption_matches)
    assert truth is not None
    objs = [[SceneObject(**o) for o in per] for per in data.objects]
    for t in range(0, n_t, 7):
        for i in range(n_i):
            assert truth(t, i) == (data.txt2img[t] == i or caption_matches(data.texts[t], objs[i]))
    # every generated caption is true of its own image by the scenes' own judgement (not by construction)
    assert all(caption_matches(data.texts[t], objs[data.txt2img[t]]) for t in range(n_t))
    want_g = group_accuracy(s_i2t, data.img2txt, data.txt2img, data.groups, s_t2i, truth=truth)
    assert rr.group is not None and want_g is not None
    assert (rr.group.t2i, rr.group.i2t, rr.group.t2i_chance) == pytest.approx(
        (want_g.t2i, want_g.i2t, want_g.t2i_chance)
    )
    assert 0 < rr.group.t2i_chance < 1
    # truth-aware recall on the same matrices, against the brute force over the full truth table
    true = np.array([[truth(t, i) for i in range(n_i)] for t in range(n_t)])
    for res, mats in ((rr, (s_i2t, s_t2i)), (report.result("dual"), (sims, None))):
        assert res.truth_recall is not None
        got = dict(zip(TRUTH_RECALL_KEYS, as_dict(res.truth_recall).values(), strict=True))
        want = brute_truth_recall(np.asarray(mats[0]), true, None if mats[1] is None else np.asarray(mats[1]))
        assert got == pytest.approx(want, abs=1e-9)
        for key, v in as_dict(res.recall).items():
            assert got[f"{key}_true"] >= v  # annotated pairs are true: never below ALBEF's protocol
        js = res.to_json()
        assert {*MODE_KEYS, *TRUTH_RECALL_KEYS} <= set(js) and js["ir_r1"] == round(res.recall.ir_r1, 4)


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
        (["--runtime", "tensorrt"], "--runtime"),
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
        assert set(obj[mode]) == set(MODE_KEYS) | set(GROUP_KEYS) | set(TRUTH_RECALL_KEYS), mode
        for key in ("tr_r1", "ir_r1", "ir_r5", "r_mean"):
            assert obj[mode][f"{key}_true"] >= obj[mode][key], (mode, key)
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
    assert "all_pairs" in out and "rerank" in out and "r_mean" in out and "truth-aware recall" in out
    # all_pairs over the cap is refused with one line
    code, _out, err = _run_cli([*args, "--max-all-pairs", "10"], monkeypatch, capsys)
    assert code == 2 and "cap" in err


def test_cli_runtime_onnx_reencodes_and_matches_torch(  # type: ignore[no-untyped-def]
    scenes: Path, tiny_collection, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``eval --runtime onnx``: the split is encoded by ONNX Runtime (not read from the torch-built
    collection), the JSON says which runtime ran each model, and fp32 ONNX gives torch's recall."""
    pytest.importorskip("onnxruntime")
    path, _cross = tiny_collection
    args = ["eval", str(path), "--karpathy", str(scenes), "--k-test", "3", "--json", "--device", "cpu"]
    code, out, err = _run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    torch_run = json.loads(out)
    code, out, err = _run_cli([*args, "--runtime", "onnx"], monkeypatch, capsys)
    assert code == 0, err
    onnx_run = json.loads(out)
    assert (
        torch_run["meta"]["dual_runtime"] == "torch fp32" and torch_run["meta"]["embeddings"] == "collection"
    )
    assert (
        onnx_run["meta"]["dual_runtime"] == "onnx fp32" and onnx_run["meta"]["cross_runtime"] == "onnx fp32"
    )
    assert onnx_run["meta"]["embeddings"] == "encoded" and onnx_run["meta"]["encoded_now"] == 72
    for mode in ("dual", "rerank"):
        for key in ("tr_r1", "tr_r5", "ir_r1", "ir_r5"):
            # stored vectors/tokens are fp16-rounded copies of torch's: at most one item may move on a near-tie
            assert abs(torch_run[mode][key] - onnx_run[mode][key]) <= 100 / 60 + 1e-9, (mode, key)


def test_group_accuracy_judges_by_truth_only_when_given_a_truth_function(scenes: Path, dual) -> None:  # type: ignore[no-untyped-def]
    data = load_eval_data(scenes)
    assert data.groups is not None
    sizes = {g: data.groups.count(g) for g in set(data.groups)}
    in_groups = sum(len(data.img2txt[i]) for i, g in enumerate(data.groups) if sizes[g] > 1)
    plain = evaluate(None, scenes, None, dual, None, ["dual"], 4, 64).result("dual").group
    judged = (
        evaluate(None, scenes, None, dual, None, ["dual"], 4, 64, truth=caption_matches).result("dual").group
    )
    assert plain is not None and judged is not None
    assert plain.texts == in_groups  # annotation rule: every caption of a 2+ group is a choice
    assert judged.texts < plain.texts  # captions true of every sibling decide nothing
    calls: list[str] = []

    def never(caption: str, objects: Sequence[dict]) -> bool:
        calls.append(caption)
        return False

    # a truth function that only its own image satisfies gives the annotation rule's numbers
    same = evaluate(None, scenes, None, dual, None, ["dual"], 4, 64, truth=never).result("dual").group
    assert calls and same == plain
    # without a truth function there is no truth-aware recall (and no *_true keys)
    res = evaluate(None, scenes, None, dual, None, ["dual"], 4, 64).result("dual")
    assert res.truth_recall is None and not set(TRUTH_RECALL_KEYS) & set(res.to_json())
