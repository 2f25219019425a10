"""CPU runtimes (models/runtime): ONNX Runtime parity with torch, int8 (ONNX Runtime and torch), the graph
cache (beside the weights, per-user fallback, stale rebuild, atomic export) and the runtime choice."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.bert import BertSelfAttention, linear_params
from alignfuse.models.albef.config import ALBEF_CONFIGS, TINY_VOCAB
from alignfuse.models.albef.model import AlbefModel
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder
from alignfuse.models.runtime import quantize_torch, resolve_runtime, runtime_label

pytest.importorskip("onnxruntime")

TEXTS = ["a red circle left of a blue square", "a green triangle", "two small yellow stars above a cat", "x"]
TOL = 1e-4


def _pixels(model: object, n: int, seed: int = 0) -> torch.Tensor:
    size = model.info.preprocess.image_size  # type: ignore[attr-defined]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _scores(cross: object, texts: list[str], pixels: torch.Tensor) -> list[np.ndarray]:
    """Logits of 1 text x n images, n texts x 1 image and n aligned pairs."""
    c = cross
    n = len(pixels)
    st = c.image_states(pixels)  # type: ignore[attr-defined]
    one_many = c.score(c.text_states(texts[:1]), st).logit  # type: ignore[attr-defined]
    many_one = c.score(c.text_states(texts[:n]), c.image_states(pixels[:1])).logit  # type: ignore[attr-defined]
    aligned = c.score(c.text_states(texts[:n]), st).logit  # type: ignore[attr-defined]
    tok = c.image_states_from_tokens(st.tokens.to(torch.float16))  # type: ignore[attr-defined]
    cached = c.score(c.text_states(texts[:1]), tok).logit  # type: ignore[attr-defined]
    return [np.asarray(x) for x in (one_many, many_one, aligned, cached)]


def _assert_parity(spec: str, cache: Path, n: int = 4, texts: list[str] = TEXTS) -> None:
    td = create_dual_encoder(spec, "cpu", "fp32", "torch")
    od = create_dual_encoder(spec, "cpu", "fp32", "onnx", cache)
    assert od.runtime == "onnx" and od.precision == "fp32"  # type: ignore[attr-defined]
    px = _pixels(td, n)
    np.testing.assert_allclose(od.encode_images(px), td.encode_images(px), atol=TOL, rtol=0)
    np.testing.assert_allclose(od.encode_texts(texts), td.encode_texts(texts), atol=TOL, rtol=0)
    if not spec.startswith("albef"):
        return
    tc = create_cross_encoder(spec, "cpu", "fp32", "torch")
    oc = create_cross_encoder(spec, "cpu", "fp32", "onnx", cache)
    ts_t, ts_o = tc.text_states(texts), oc.text_states(texts)
    assert ts_o.hidden is not None and ts_t.hidden is not None
    length = ts_o.hidden.shape[1]  # the ONNX adapter drops trailing padding
    np.testing.assert_allclose(ts_o.hidden.numpy(), ts_t.hidden[:, :length].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(
        oc.image_states(px).tokens.numpy(), tc.image_states(px).tokens.numpy(), atol=TOL, rtol=0
    )
    for got, want in zip(_scores(oc, texts, px), _scores(tc, texts, px), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_onnx_fp32_parity_tiny_albef(tmp_path: Path) -> None:
    _assert_parity("albef:tiny", tmp_path)


def test_onnx_fp32_parity_open_clip(tmp_path: Path) -> None:
    # short and long texts: the text graph takes any length (cut after the batch's longest text)
    _assert_parity("alignfuse:random-tiny", tmp_path, texts=[*TEXTS, "word " * 40])


def _base_spec(tmp_path: Path) -> str:
    from dataclasses import replace

    path = tmp_path / "base.json"
    path.write_text(replace(ALBEF_CONFIGS["base"], vocab=TINY_VOCAB).to_json(), encoding="utf-8")
    return f"albef:{path}"


@pytest.mark.slow
def test_base_albef_onnx_fp32_parity(tmp_path: Path) -> None:
    """Base sizes (random weights): fp32 ONNX within 1e-4 of torch on embeddings, states and logits."""
    _assert_parity(_base_spec(tmp_path), tmp_path / "graphs", n=2, texts=TEXTS[:2])


@pytest.mark.slow
@pytest.mark.xfail(
    reason="measured (bench/results/cpu.json): int8 keeps 5/10 (ONNX Runtime) and 3/10 (torch) of the top 10 "
    "at C=128 on random base weights, whose ITM logits barely differ between candidates; int8 stays opt-in",
    strict=False,
)
def test_base_albef_int8_top10(tmp_path: Path) -> None:
    """Base sizes (random weights): int8 (ONNX Runtime and torch) keeps the top 10 of a rerank over 64
    candidates (overlap >= 0.9)."""
    spec = _base_spec(tmp_path)
    gen = torch.Generator().manual_seed(3)
    cfg = ALBEF_CONFIGS["base"]
    tokens = (torch.randn(64, cfg.num_image_tokens, cfg.vision_width, generator=gen) * 0.5).to(torch.float16)
    ref = None
    for runtime, precision in (("torch", "fp32"), ("onnx", "int8"), ("torch", "int8")):
        cross = create_cross_encoder(spec, "cpu", precision, runtime, tmp_path / "graphs")
        logit = cross.score(cross.text_states(TEXTS[:1]), cross.image_states_from_tokens(tokens)).logit
        top = set(np.argsort(-logit)[:10])
        if ref is None:
            ref = top
        else:
            assert len(ref & top) / 10 >= 0.9, (runtime, precision, len(ref & top))


# ------------------------------------------------------------------------------------------ int8 / torch
def test_folded_cross_attention_reads_quantized_linear() -> None:
    """The folded cross-attention works on a dynamically quantized layer and equals the float layer with
    the dequantized weights (it reads them through ``linear_params``)."""
    cfg = ALBEF_CONFIGS["tiny"]
    torch.manual_seed(0)
    attn = BertSelfAttention(cfg, kv_width=cfg.encoder_width).eval()
    q: Any = quantize_torch(nn.Sequential(attn))[0]
    assert callable(q.key.weight)  # a quantized Linear: .weight is a method
    w, b = linear_params(q.key)
    assert w.dtype == torch.float32 and w.shape == attn.key.weight.shape and b is not None
    deq = BertSelfAttention(cfg, kv_width=cfg.encoder_width).eval()
    with torch.no_grad():
        for name in ("query", "key", "value"):
            lw, lb = linear_params(getattr(q, name))
            getattr(deq, name).weight.copy_(lw)
            getattr(deq, name).bias.copy_(lb)
    q.query = deq.query  # same float queries on both sides: only the key/value weights are quantized
    x, tokens = torch.randn(1, 3, cfg.hidden_size), torch.randn(5, 17, cfg.encoder_width)
    assert deq.folded_is_cheaper(1, 3, 5, 17)
    with torch.no_grad():
        got = q.cross_attention_folded(x, tokens)
        want = deq.cross_attention_folded(x, tokens)
        exact = deq.cross_attention(x, deq.project_kv(tokens))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(want, exact, atol=1e-5, rtol=0)


def test_torch_int8_albef_close_to_fp32() -> None:
    """torch int8 runs end to end (folded path included: short text, many images) and stays near fp32."""
    tc = create_cross_encoder("albef:tiny", "cpu", "fp32")
    qc = create_cross_encoder("albef:tiny", "cpu", "int8", "torch")
    assert (qc.runtime, qc.precision) == ("torch", "int8")  # type: ignore[attr-defined]
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in qc.model.modules())  # type: ignore[attr-defined]
    px = _pixels(tc, 5)
    for got, want in zip(_scores(qc, ["a", *TEXTS], px), _scores(tc, ["a", *TEXTS], px), strict=True):
        np.testing.assert_allclose(got, want, atol=0.05)
    # the fp32 model the int8 one was copied from is untouched
    assert not any("quantized" in type(m).__module__ for m in tc.model.modules())  # type: ignore[attr-defined]


@pytest.mark.slow
def test_int8_rankings_tiny(tmp_path: Path) -> None:
    """ONNX int8 dual embeddings stay close to fp32 (cosine) on the tiny models."""
    for spec in ("albef:tiny", "alignfuse:random-tiny"):
        ref = create_dual_encoder(spec, "cpu", "fp32")
        for runtime in ("onnx", "torch"):
            q = create_dual_encoder(spec, "cpu", "int8", runtime, tmp_path)
            assert (q.runtime, q.precision) == (runtime, "int8")  # type: ignore[attr-defined]
            cos = (q.encode_texts(TEXTS) * ref.encode_texts(TEXTS)).sum(-1)
            assert cos.min() > 0.98, (spec, runtime, cos)


# -------------------------------------------------------------------------------------------- choice
def test_runtime_choice_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import alignfuse.models.runtime as rt

    with pytest.raises(InvalidInputError, match="runtime"):
        create_dual_encoder("albef:tiny", "cpu", "fp32", "tensorrt")
    tiny = create_dual_encoder("albef:tiny", "cpu", "fp32", "auto", tmp_path)
    assert tiny.runtime == "torch"  # type: ignore[attr-defined]  # too small for ONNX to pay
    assert resolve_runtime("auto", tiny, torch.device("cuda")) == "torch"
    assert resolve_runtime("auto", tiny, torch.device("cpu"), "bf16") == "torch"
    with pytest.raises(InvalidInputError, match="CPU only"):
        resolve_runtime("onnx", tiny, torch.device("cuda"))

    class Other:  # a model of a family without ONNX graphs (BLIP, ViLT)
        info = tiny.info.__class__(**{**tiny.info.__dict__, "family": "blip"})

    with pytest.raises(InvalidInputError, match="ONNX graphs"):
        resolve_runtime("onnx", Other(), torch.device("cpu"))
    assert resolve_runtime("auto", Other(), torch.device("cpu")) == "torch"
    monkeypatch.setattr(rt, "AUTO_MIN_PARAMS", 0)  # a "large" model: auto picks ONNX Runtime on a CPU
    big = create_cross_encoder("albef:tiny", "cpu", "fp32", "auto", tmp_path)
    assert big.runtime == "onnx"  # type: ignore[attr-defined]
    assert runtime_label(tiny, big) == "dual:torch, reranker:onnx"
    assert runtime_label(big, None) == "onnx"


# --------------------------------------------------------------------------------------------- cache
def _save_tiny(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(AlbefModel(ALBEF_CONFIGS["tiny"]).state_dict(), path)


def _onnx_files(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}


def test_graphs_beside_weights_and_rebuilt_when_stale(tmp_path: Path) -> None:
    weights = tmp_path / "w" / "tiny.pth"
    weights.parent.mkdir()
    _save_tiny(weights, 1)
    spec = f"albef:tiny@{weights}"
    oc = create_cross_encoder(spec, "cpu", "fp32", "onnx", tmp_path / "user-cache")
    folder = weights.parent / "onnx" / "tiny"
    assert {"albef-text.fp32.onnx", "albef-itm.fp32.onnx", "albef-vision.fp32.onnx"} <= set(
        _onnx_files(folder)
    )
    assert not (tmp_path / "user-cache").exists()
    meta = json.loads((folder / "albef-itm.fp32.json").read_text())
    assert (folder / "albef-itm.fp32.onnx").stat().st_mode & 0o044  # readable by a service user too
    first = _onnx_files(folder)
    px = _pixels(oc, 3)
    before = _scores(oc, TEXTS, px)[0]
    # a second model over the same weights reuses the graphs
    del oc
    gc.collect()
    create_cross_encoder(spec, "cpu", "fp32", "onnx", tmp_path / "user-cache")
    assert _onnx_files(folder) == first
    gc.collect()
    # the weights change: the graphs are stale and rebuilt, and score like the new weights
    _save_tiny(weights, 2)
    oc2 = create_cross_encoder(spec, "cpu", "fp32", "onnx", tmp_path / "user-cache")
    tc2 = create_cross_encoder(spec, "cpu", "fp32", "torch")
    meta2 = json.loads((folder / "albef-itm.fp32.json").read_text())
    assert meta2["weights_sha256"] != meta["weights_sha256"]
    assert all(_onnx_files(folder)[k] != v for k, v in first.items())
    after = _scores(oc2, TEXTS, px)
    assert not np.allclose(after[0], before, atol=1e-3)
    for got, want in zip(after, _scores(tc2, TEXTS, px), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_graphs_fall_back_to_user_cache_when_weights_folder_not_writable(tmp_path: Path) -> None:
    weights = tmp_path / "ro" / "tiny.pth"
    weights.parent.mkdir()
    _save_tiny(weights, 1)
    # the graph folder beside the weights cannot be created (root ignores permission bits, so block the
    # path with a file; as another user a read-only folder does the same)
    (weights.parent / "onnx").write_text("not a folder")
    os.chmod(weights.parent, 0o555)
    try:
        od = create_dual_encoder(f"albef:tiny@{weights}", "cpu", "fp32", "onnx", tmp_path / "user-cache")
    finally:
        os.chmod(weights.parent, 0o755)
    cached = list((tmp_path / "user-cache" / "onnx").glob("*/albef-text.fp32.onnx"))
    assert len(cached) == 1 and cached[0].parent.name == od.info.weights_sha256[:16]
    td = create_dual_encoder(f"albef:tiny@{weights}", "cpu", "fp32")
    np.testing.assert_allclose(od.encode_texts(TEXTS), td.encode_texts(TEXTS), atol=TOL, rtol=0)


def test_corrupt_cached_graph_is_rebuilt(tmp_path: Path) -> None:
    od = create_dual_encoder("albef:tiny", "cpu", "fp32", "onnx", tmp_path)
    (graph,) = tmp_path.glob("onnx/*/albef-text.fp32.onnx")
    want = od.encode_texts(TEXTS)
    del od
    gc.collect()
    graph.write_bytes(graph.read_bytes()[:1000])  # damaged on disk, sidecar still matching
    od2 = create_dual_encoder("albef:tiny", "cpu", "fp32", "onnx", tmp_path)
    np.testing.assert_allclose(od2.encode_texts(TEXTS), want, atol=TOL, rtol=0)


@pytest.mark.slow
def test_killed_export_leaves_no_graph_that_loads(tmp_path: Path) -> None:
    """A process SIGKILLed in the middle of writing a graph leaves nothing a later process loads: the next
    start exports again and gets correct scores."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        real = torch.onnx.export
        def dying_export(module, args, f, **kw):
            real(module, args, f, **kw)
            with open(f, "r+b") as fh:  # half of the graph written, then the process dies
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.onnx.export = dying_export
        from alignfuse.models.registry import create_dual_encoder
        create_dual_encoder("albef:tiny", "cpu", "fp32", "onnx", {str(tmp_path)!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = next((tmp_path / "onnx").iterdir())
    assert not list(folder.glob("*.onnx")) and not list(folder.glob("*.json"))  # only a temporary file
    od = create_dual_encoder("albef:tiny", "cpu", "fp32", "onnx", tmp_path)
    td = create_dual_encoder("albef:tiny", "cpu", "fp32")
    np.testing.assert_allclose(od.encode_texts(TEXTS), td.encode_texts(TEXTS), atol=TOL, rtol=0)
