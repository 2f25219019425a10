"""Which int8 layers cost the ranking? Base-size ALBEF (random weights) ITM graph on ONNX Runtime, fp32 text
states, C candidates of random image tokens: top-10 overlap of each int8 variant with the fp32 graph.

Variants: every weight MatMul int8 (what ``--precision int8`` ships), and the same with some layers kept fp32
(the attention projections, the FFN + attention outputs, the cross-attention queries). If one split kept the
top 10 at a useful speed it could become the int8 recipe; ``docs/benchmarks.md`` reports what it found.

Usage::

    python bench/int8_split.py            # base size, C=64, 3 texts x 3 token seeds (~3 min, 1 thread)
    python bench/int8_split.py --toy      # tiny config (the end-to-end test)

Writes ``bench/results/int8_split.json`` and ``docs/img/int8_split.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ann_data import git_commit, machine  # noqa: E402

TEXTS = ["a red circle left of a blue square", "a green triangle", "two small yellow stars above a cat"]
#: name patterns of the weight MatMuls kept fp32 (torch.onnx names them after the modules)
VARIANTS: dict[str, tuple[str, ...]] = {
    "all int8": (),
    "attention Q/K/V fp32": ("/query", "/key", "/value"),
    "FFN + attention outputs fp32": ("/intermediate", "/output"),
    "cross-attention queries fp32": tuple(f"/query_{i}/" for i in range(1, 24, 2)),
}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(config: str, candidates: int, seeds: int, work: Path) -> dict[str, Any]:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from alignfuse.models.albef.config import ALBEF_CONFIGS, TINY_VOCAB
    from alignfuse.models.registry import create_cross_encoder

    torch.set_num_threads(1)
    cfg = replace(ALBEF_CONFIGS[config], vocab=TINY_VOCAB)
    spec_file = work / "config.json"
    spec_file.write_text(cfg.to_json(), encoding="utf-8")
    cross: Any = create_cross_encoder(f"albef:{spec_file}", "cpu", "fp32", "onnx", work / "graphs")
    cases = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(3 + seed)
        tokens = torch.randn(candidates, cfg.num_image_tokens, cfg.vision_width, generator=gen) * 0.5
        tok = tokens.to(torch.float16).float().numpy()  # as the feature cache stores them
        for text in TEXTS:
            ts = cross.text_states([text])
            st, mk = ts.hidden.numpy().astype(np.float32), ts.mask.numpy().astype(np.int64)
            cases.append(
                {
                    "states": np.ascontiguousarray(np.broadcast_to(st, (candidates, *st.shape[1:]))),
                    "mask": np.ascontiguousarray(np.broadcast_to(mk, (candidates, *mk.shape[1:]))),
                    "tokens": tok,
                }
            )
    fp32_path = next((work / "graphs").rglob("albef-itm.fp32.onnx"))
    weight_matmuls = [n.name for n in onnx.load(str(fp32_path)).graph.node if n.op_type in ("MatMul", "Gemm")]

    def timed(sess: Any) -> tuple[list[np.ndarray], float]:
        sess.run(None, cases[0])  # warm-up
        t0 = time.perf_counter()
        outs = [sess.run(None, c)[0][:, 1] for c in cases]
        return outs, (time.perf_counter() - t0) / len(cases)

    ref, fp32_s = timed(_session(fp32_path))
    spread = float(np.mean([np.std(r) for r in ref]))
    out: dict[str, Any] = {"fp32": {"seconds_per_rerank": round(fp32_s, 3)}, "variants": {}}
    for label, patterns in VARIANTS.items():
        keep = [n for n in weight_matmuls if any(p in n for p in patterns)]
        dst = work / f"itm-{len(out['variants'])}.onnx"
        quantize_dynamic(
            str(fp32_path),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=keep,
        )
        got, secs = timed(_session(dst))
        overlaps = [
            len(set(np.argsort(-r)[:10]) & set(np.argsort(-g)[:10])) / 10
            for r, g in zip(ref, got, strict=True)
        ]
        noise = float(np.mean([np.std(r - g) for r, g in zip(ref, got, strict=True)]))
        out["variants"][label] = {
            "kept_fp32": len(keep),
            "top10_overlap_mean": round(float(np.mean(overlaps)), 3),
            "top10_overlap_min": round(float(min(overlaps)), 3),
            "logit_noise_std": round(noise, 5),
            "seconds_per_rerank": round(secs, 3),
            "speedup_vs_fp32": round(fp32_s / secs, 2),
        }
    out["logit_spread_std_fp32"] = round(spread, 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base")
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--toy", action="store_true", help="tiny config, C=16, one seed")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_split.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "int8_split.png")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args()
    if a.toy:
        a.config, a.candidates, a.seeds = "tiny", 16, 1
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="af-int8-", dir=a.workdir) as tmp:
        res = run(a.config, a.candidates, a.seeds, Path(tmp))
    result = {
        "benchmark": "int8 layer split of the ALBEF ITM graph (ONNX Runtime, dynamic per-channel int8)",
        "script": "bench/int8_split.py",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "loadavg_before": [round(x, 2) for x in load],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "config": a.config,
        "candidates": a.candidates,
        "cases": a.seeds * len(TEXTS),
        "threads": 1,
        **res,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, a.plot)
    print(json.dumps(result["variants"]))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["variants"])
    v = result["variants"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(len(labels))
    ax.bar(
        x - 0.2, [v[k]["top10_overlap_mean"] for k in labels], 0.4, label="top-10 overlap with fp32 (mean)"
    )
    ax.bar(x + 0.2, [v[k]["speedup_vs_fp32"] for k in labels], 0.4, label="speed-up over fp32 ONNX")
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set_xticks(x, [lab.replace(" fp32", "\nfp32") for lab in labels], fontsize=8)
    ax.set_title(
        f"ALBEF {result['config']} ITM graph, C={result['candidates']}, {result['cases']} cases, 1 thread, "
        f"load {result['loadavg_before'][0]:.1f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
