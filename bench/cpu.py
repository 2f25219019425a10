"""CPU serving speed: torch fp32 / ONNX Runtime fp32 / ONNX Runtime int8 / torch int8 / torch bf16 (issue 16).

For base-size ALBEF (ViT-B/16 at 384 px + BERT-base, random weights) and open_clip ViT-B-32 (random weights),
at 1 and 2 threads, per variant:

* ``text_ms``: one query's text encoding (ALBEF: the reranker's text states; ViT-B-32: the dual encoder's
  query embedding);
* ``rerank_s[C]``: one query reranked against C candidates whose vision tokens come from the feature cache
  (fp16, as ``service/engine/rerank_inputs.py`` feeds ``ImageStates``): text states + ITM over C pairs;
* ``build_images_per_s``: index-build encoding (ALBEF: ITC embeddings + the vision tokens the feature cache
  keeps; ViT-B-32: image embeddings), from transformed pixels.

Against the FLOPs (counted with ``torch.utils.flop_counter`` on the torch model) and the machine's measured
fp32 (torch GEMM) and int8 (ONNX Runtime ``MatMulInteger``) matmul rates: ``ceiling_*`` is FLOPs / rate, the
time a kernel running at the matmul rate would take. Also the top-10 overlap of each variant's rerank with
torch fp32's at the largest C. ``torch-bf16`` (fp32 weights under bf16 autocast) runs only on a CPU with native
bf16 (Intel AMX / AVX512-BF16: ``alignfuse.models.base.cpu_has_native_bf16``); elsewhere it would run fp32 and
is left out (``variants_skipped``); open_clip runs fp32 where bf16 is asked on a CPU (bf16 autocast measured
slower for it), so its bf16 row is left out too (``variants_not_run``). The bf16 matmul rate is measured too.

``python bench/cpu.py`` (base sizes; slow on a loaded 2-core machine), ``--quick`` (tiny models, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import ROOT, machine_info

VARIANTS = (("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"), ("torch", "int8"), ("torch", "bf16"))


def variants() -> tuple[tuple[str, str], ...]:
    """The variants this CPU runs as named (bf16 only with native bf16; elsewhere it would be fp32 again)."""
    from alignfuse.models.base import cpu_has_native_bf16

    return tuple(v for v in VARIANTS if v[1] != "bf16" or cpu_has_native_bf16())


QUERY = "a man riding a bike down a street next to a red bus"


def _time(fn: Callable[[], Any], repeats: int, warm: bool = True) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (``warm``)."""
    if warm:
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def matmul_rates(threads: int, size: int) -> dict[str, float]:
    """GFLOP/s of a [size x size] x [size x size] matmul: torch fp32 and ONNX Runtime MatMulInteger (u8 x s8)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    flops = 2.0 * size**3
    fp32 = flops / _time(lambda: a @ b, 5) / 1e9
    a16, b16 = a.bfloat16(), b.bfloat16()
    bf16 = flops / _time(lambda: a16 @ b16, 5) / 1e9
    w = np.random.default_rng(0).integers(-127, 127, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "mmi",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [helper.make_tensor("w", TensorProto.INT8, [size, size], w.tobytes(), raw=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)
    int8 = flops / _time(lambda: sess.run(None, {"a": x}), 5) / 1e9
    _ = onnx
    return {"fp32_gflops": round(fp32, 2), "int8_gops": round(int8, 2), "bf16_gflops": round(bf16, 2)}


def _flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    k = min(10, len(a))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def bench_albef(
    spec: str, args: argparse.Namespace, threads: int, cache: Path, rates: dict[str, float]
) -> dict[str, Any]:
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    label = "albef:base (random init, built-in vocab)" if spec.endswith(".json") else spec
    out: dict[str, Any] = {"model": label, "threads": threads, "variants": {}}
    ref_logits: np.ndarray | None = None
    base = create_cross_encoder(spec, "cpu", "fp32", "torch")
    cfg = base.bundle.config  # type: ignore[attr-defined]
    tokens = (
        torch.randn(max(args.candidates), cfg.num_image_tokens, cfg.vision_width, generator=gen) * 0.5
    ).to(torch.float16)
    pixels = torch.randn(args.build_batch, 3, cfg.image_res, cfg.image_res, generator=gen)
    ts = base.text_states([QUERY])
    out["flops"] = {
        "text_query": _flops(lambda: base.text_states([QUERY])),
        "rerank_per_pair": _flops(lambda: base.score(ts, base.image_states_from_tokens(tokens[:8]))) / 8,
        "build_per_image": _flops(lambda: base.image_states(pixels[:1])),
    }
    for runtime, precision in variants():
        name = f"{runtime}-{precision}"
        t0 = time.perf_counter()
        cross = create_cross_encoder(spec, "cpu", precision, runtime, cache)
        dual = create_dual_encoder(spec, "cpu", precision, runtime, cache)
        load_s = time.perf_counter() - t0
        row: dict[str, Any] = {"load_s": round(load_s, 2)}
        row["text_ms"] = 1e3 * _time(partial(cross.text_states, [QUERY]), args.repeats * 3)
        rerank: dict[str, float] = {}
        logits = None
        for c in args.candidates:

            def one(cr: Any = cross, c: int = c) -> Any:
                return cr.score(cr.text_states([QUERY]), cr.image_states_from_tokens(tokens[:c]))

            rerank[str(c)] = _time(one, args.repeats, warm=not rerank)  # warm once, at the smallest C
            if c == max(args.candidates):
                logits = one().logit
        row["rerank_s"] = rerank
        row["build_images_per_s"] = len(pixels) / _time(
            partial(dual.encode_images_with_tokens, pixels),  # type: ignore[attr-defined]
            max(1, args.repeats // 2),
        )
        assert logits is not None
        if ref_logits is None:
            ref_logits = logits
        row["top10_overlap_vs_torch_fp32"] = _top10_overlap(ref_logits, logits)
        out["variants"][name] = row
        print(f"  albef {name} t={threads}: text {row['text_ms']:.1f} ms, rerank {rerank}, "
              f"build {row['build_images_per_s']:.2f} img/s, load {load_s:.1f} s", flush=True)  # fmt: skip
        del cross, dual
    rate = rates["fp32_gflops"] * 1e9
    out["ceiling_fp32"] = {
        "text_ms": 1e3 * out["flops"]["text_query"] / rate,
        "rerank_s": {str(c): c * out["flops"]["rerank_per_pair"] / rate for c in args.candidates},
        "build_images_per_s": rate / out["flops"]["build_per_image"],
    }
    irate = rates["int8_gops"] * 1e9
    out["ceiling_int8"] = {
        "rerank_s": {str(c): c * out["flops"]["rerank_per_pair"] / irate for c in args.candidates},
        "build_images_per_s": irate / out["flops"]["build_per_image"],
    }
    brate = rates["bf16_gflops"] * 1e9
    out["ceiling_bf16"] = {
        "rerank_s": {str(c): c * out["flops"]["rerank_per_pair"] / brate for c in args.candidates},
        "build_images_per_s": brate / out["flops"]["build_per_image"],
    }
    return out


def bench_clip(
    spec: str, args: argparse.Namespace, threads: int, cache: Path, rates: dict[str, float]
) -> dict[str, Any]:
    from alignfuse.models.registry import create_dual_encoder

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"model": spec, "threads": threads, "variants": {}}
    base = create_dual_encoder(spec, "cpu", "fp32", "torch")
    size = base.info.preprocess.image_size
    pixels = torch.randn(args.build_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    out["flops"] = {
        "text_query": _flops(lambda: base.encode_texts([QUERY])),
        "build_per_image": _flops(lambda: base.encode_images(pixels[:1])),
    }
    ref = base.encode_texts([QUERY, "a cat", "two dogs on a beach at sunset"])
    for runtime, precision in variants():
        name = f"{runtime}-{precision}"
        t0 = time.perf_counter()
        dual = create_dual_encoder(spec, "cpu", precision, runtime, cache)
        if (
            getattr(dual, "precision", precision) != precision
        ):  # open_clip runs fp32 where bf16 is asked on a CPU
            out.setdefault("variants_not_run", {})[name] = (
                f"runs {dual.precision} (models.registry._cpu_precision)"  # type: ignore[attr-defined]
            )
            continue
        row: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2)}
        row["text_ms"] = 1e3 * _time(partial(dual.encode_texts, [QUERY]), args.repeats * 5)
        row["build_images_per_s"] = len(pixels) / _time(
            partial(dual.encode_images, pixels), max(1, args.repeats // 2)
        )
        emb = dual.encode_texts([QUERY, "a cat", "two dogs on a beach at sunset"])
        row["text_cosine_vs_torch_fp32_min"] = float((emb * ref).sum(-1).min())
        out["variants"][name] = row
        print(f"  clip {name} t={threads}: text {row['text_ms']:.1f} ms, "
              f"build {row['build_images_per_s']:.2f} img/s", flush=True)  # fmt: skip
    rate = rates["fp32_gflops"] * 1e9
    out["ceiling_fp32"] = {
        "text_ms": 1e3 * out["flops"]["text_query"] / rate,
        "build_images_per_s": rate / out["flops"]["build_per_image"],
    }
    out["ceiling_int8"] = {"build_images_per_s": rates["int8_gops"] * 1e9 / out["flops"]["build_per_image"]}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["albef"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        cs = [int(c) for c in run["ceiling_fp32"]["rerank_s"]]
        for name, row in run["variants"].items():
            ax.plot(cs, [row["rerank_s"][str(c)] for c in cs], marker="o", label=name)
        ax.plot(cs, list(run["ceiling_fp32"]["rerank_s"].values()), "k--", label="fp32 matmul ceiling")
        ax.plot(cs, list(run["ceiling_int8"]["rerank_s"].values()), "k:", label="int8 matmul ceiling")
        if "ceiling_bf16" in run:
            ax.plot(cs, list(run["ceiling_bf16"]["rerank_s"].values()), "k-.", label="bf16 matmul ceiling")
        if result["targets"]["rerank_s"]:
            ax.scatter(
                [int(c) for c in result["targets"]["rerank_s"]], list(result["targets"]["rerank_s"].values()),
                marker="*", s=120, color="red", zorder=5, label="target (2 threads)",
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("candidates C")
        ax.set_ylabel("rerank latency per query (s)")
        ax.set_title(f"{run['model']}, {run['threads']} thread(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("CPU rerank: torch / ONNX Runtime, fp32 / int8 / bf16 (cached image tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def base_config_spec(folder: Path) -> str:
    """``albef:<json>``: ALBEF's base sizes with the package's built-in WordPiece vocabulary (bert-base-uncased's
    is not available offline; the token count of a query, all that matters for speed, is about the same)."""
    from dataclasses import replace

    from alignfuse.models.albef.config import ALBEF_CONFIGS, TINY_VOCAB

    path = folder / "albef-base-builtin-vocab.json"
    path.write_text(replace(ALBEF_CONFIGS["base"], vocab=TINY_VOCAB).to_json(), encoding="utf-8")
    return f"albef:{path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (seconds): for the test")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--albef-threads", type=int, nargs="+", default=None, help="ALBEF at these (default: --threads)"
    )
    p.add_argument("--candidates", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--build-batch", type=int, default=4)
    p.add_argument("--models", nargs="+", default=["albef", "clip"], choices=["albef", "clip"])
    p.add_argument("--cache", type=Path, default=None, help="ONNX graph cache (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/cpu.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/img/cpu.png")
    args = p.parse_args(argv)
    albef_spec, clip_spec = "albef:base", "open_clip:ViT-B-32"
    if args.quick:
        albef_spec, clip_spec = "albef:tiny", "alignfuse:random-tiny"
        args.candidates = [c for c in args.candidates if c <= 16] or [4, 8]
        args.threads = args.threads[:1]
        args.repeats = 1
        args.build_batch = 2
    result: dict[str, Any] = {
        "benchmark": "CPU inference: torch / ONNX Runtime, fp32 / int8 (issue 16)",
        "quick": args.quick,
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "cache")},
        "models": {"albef": "ALBEF base (ViT-B/16 384 px + BERT-base), random init", "clip": clip_spec},
        "targets": {"rerank_s": {} if args.quick else {"32": 0.3, "128": 1.2}, "clip_text_ms": 15.0,
                    "build_speedup": 2.0, "threads": 2},
        "matmul": {},
        "variants_skipped": [f"{r}-{p}" for r, p in VARIANTS if (r, p) not in variants()],
        "albef": [],
        "clip": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="af-cpu-bench-") as tmp:
        cache = args.cache or Path(tmp)
        if not args.quick:
            albef_spec = base_config_spec(Path(tmp))
        for threads in args.threads:
            rates = matmul_rates(threads, 256 if args.quick else 1024)
            result["matmul"][str(threads)] = rates
            print(f"threads {threads}: matmul {rates}", flush=True)
            if "albef" in args.models and (args.albef_threads is None or threads in args.albef_threads):
                result["albef"].append(bench_albef(albef_spec, args, threads, cache, rates))
            if "clip" in args.models:
                result["clip"].append(bench_clip(clip_spec, args, threads, cache, rates))
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if result["albef"]:
        plot(result, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
