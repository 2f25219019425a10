"""GPU benchmark, one command under a hard time budget (default 450 s, `make bench-gpu`): what the GPU gives
each stage of alignfuse, each figure against the physical ceiling of the card it ran on.

Measured (random weights; inputs already on the device):

* ``ceilings``: an N×N×N matmul per dtype (8192, fp32 and bf16, CUDA events) and a 1 GiB device copy; the
  ceiling of a workload is 1 / max(FLOPs ÷ matmul rate, bytes ÷ copy bandwidth) items/s.
* ``vit``: images/s of ALBEF's visual encoder (timm ViT-B/16 at 384 px, the dual-encoder build path), batch
  64 and 256, fp32 and bf16; FLOPs per image counted by ``torch.utils.flop_counter``.
* ``rerank``: pairs/s of the ALBEF base ITM rerank, text→image (1 text × C images), C = 64 and 256, fp32 and
  bf16, with and without the cross-attention K/V cache (``measure_rerank`` of ``bench/rerank.py``); FLOPs per
  pair counted on the same path.
* ``rerank_vs_albef``: ``bench/rerank.py``'s own rows on this device in bf16 (ALBEF's evaluation loop as the
  reference vs ours vs ours + K/V, both directions): what ``bench/rerank_gpu.sh`` used to run.
* ``faiss``: 1M clustered 256-d vectors (``bench/ann.py``): faiss-gpu Flat vs faiss CPU Flat and the CPU's
  automatic index (``choose_index_key``, built by ``alignfuse.index.ann.build_index``), queries/s at batch 1
  and 64 and recall@10 against exact search; plus a torch matmul + top-k on the GPU, a labelled stand-in that
  also runs where faiss has no GPU (the script says so: ``faiss.get_num_gpus() == 0``) or is not installed.

Every step checks the budget (counted from the start of this script) and is skipped, and recorded, when it
would not fit; the JSON is rewritten after each section, and a watchdog ends the process at budget + 60 s.

Usage::

    python bench/gpu.py                          # CUDA: writes bench/results/gpu-<card name>.json
    python bench/gpu.py --toy --out /tmp/g.json  # CPU dry run at toy sizes (the test)
    python bench/gpu.py --toy --device cuda      # a quick smoke run on the GPU
"""

# ruff: noqa: E402  (imports follow the budget clock)
from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here: imports, CUDA init and transfers included

import argparse
import contextlib
import faulthandler
import importlib.util
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]


from gpu_common import (
    DTYPES,
    Budget,
    Ceiling,
    count_flops,
    measure_ceiling,
    print_table,
    summary,
    sync,
    time_calls,
)
from gpu_faiss import FaissSizes, run_faiss

if TYPE_CHECKING:  # imported in the functions: a run without CUDA stops before loading the models
    from alignfuse.models.albef.config import AlbefConfig

FULL: dict[str, Any] = {
    "albef": "base",
    "candidates": (64, 256),
    "vit_batches": (64, 256),
    "reps": 10,
    "cap_s": 10.0,
    "matmul_n": 8192,
    "copy_mib": 1024,
    "faiss": FaissSizes(1_000_000, 256, 2048, 2048, 200, 1_000_000, 10.0),
}
TOY: dict[str, Any] = {
    "albef": "tiny",
    "candidates": (8,),
    "vit_batches": (4,),
    "reps": 2,
    "cap_s": 2.0,
    "matmul_n": 256,
    "copy_mib": 16,
    # the CPU auto choice is asked about 1M vectors (the full run's size) and built on the toy data
    "faiss": FaissSizes(4000, 32, 20, 128, 16, 1_000_000, 2.0),
}
GRACE_S = 60.0
SECTIONS = {"vit", "rerank", "rerank_vs_albef", "faiss"}


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def card_info(device: torch.device) -> dict[str, Any] | None:
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "driver": smi.splitlines()[0] if smi else None,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "timm", "faiss", "alignfuse"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", None)
        except ImportError:
            versions[mod] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------- ViT
def bench_vit(cfg: AlbefConfig, device: torch.device, batches: tuple[int, ...], reps: int, cap_s: float,
              budget: Budget, ceil: Ceiling) -> dict[str, Any]:  # fmt: skip
    from alignfuse.models.albef.model import build_visual_encoder

    r = cfg.image_res
    if not budget.allow("vit: count FLOPs", 5.0):
        return {"rows": []}
    torch.manual_seed(0)
    with torch.device(device):
        vit = build_visual_encoder(cfg).eval()
    flops2, ops = count_flops(lambda: vit.forward_features(torch.zeros(2, 3, r, r, device=device)))
    per_image = flops2 / 2
    rows = []
    for name in ("fp32", "bf16"):  # fp32 first: the cast to bf16 is the last one
        vit.to(DTYPES[name])
        for b in batches:
            what = f"vit {name} batch {b}"
            if not budget.allow(what, (reps + 2) * b * per_image / (0.2 * ceil.matmul_flops[name]) + 2):
                continue
            px = torch.randn(b, 3, r, r, device=device, dtype=DTYPES[name])
            with torch.inference_mode():
                vit.forward_features(px)
                sync(device)
                times = time_calls(partial(vit.forward_features, px), device, reps, cap_s)
            stats = summary(times)
            ips = b / float(stats["median_s"])
            top = ceil.items_per_s(per_image, name)
            rows.append({"dtype": name, "batch": b, "images_per_s": ips, "ceiling_images_per_s": top,
                         "ceiling_ratio": ips / top, **stats})  # fmt: skip
            print(
                f"  {what:<24} {ips:10.1f} images/s  ceiling {top:10.1f}  ratio {ips / top:.2f}", flush=True
            )
    return {
        "model": f"ALBEF visual encoder (timm ViT, patch {cfg.patch_size}, width {cfg.vision_width}, "
        f"depth {cfg.vision_depth}) at {r} px, forward_features, pixels on the device",
        "image_res": r,
        "flops_per_image": per_image,
        "flop_ops": ops,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------- rerank
def rerank_module() -> Any:
    """``bench/rerank.py`` (one definition of the rerank measurement for CPU and GPU)."""
    spec = importlib.util.spec_from_file_location("bench_rerank", BENCH / "rerank.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def rerank_fn(name: str, params: set[str]) -> Callable[..., Any]:
    fn = getattr(rerank_module(), name, None)
    if fn is None or not params <= set(inspect.signature(fn).parameters):
        raise RuntimeError(f"bench/rerank.py has no {name}({', '.join(sorted(params))})")
    return fn  # type: ignore[no-any-return]


def rerank_flops(
    cfg: AlbefConfig, device: torch.device, candidates: tuple[int, ...]
) -> dict[int, dict[str, float]]:
    """FLOPs of the timed calls per C: the query's text layers + C pairs through the fusion layers, with
    (``kv``) and without (``no_kv``) the K/V cache, and the K/V build itself (``kv_build``)."""
    from alignfuse.models.albef.model import AlbefModel

    torch.manual_seed(0)
    with torch.device(device):
        model = AlbefModel(cfg).eval()
    t = cfg.max_text_len
    ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (1, t), device=device)
    mask = (torch.arange(t, device=device) < min(t, 18)).long()[None]  # a 17-word query, as measure_rerank's
    flops: dict[int, dict[str, float]] = {}
    for c in candidates:
        tokens = torch.randn(c, cfg.num_image_tokens, cfg.vision_width, device=device)
        with torch.inference_mode():
            kv = model.cross_kv(tokens)

        def plain_fn(tk: torch.Tensor = tokens) -> torch.Tensor:
            return model.itm_logits(model.text_states(ids, mask), mask, tk)

        def cached_fn(kv: Any = kv) -> torch.Tensor:
            return model.itm_logits(model.text_states(ids, mask), mask, None, kv=kv)

        plain, _ = count_flops(plain_fn)
        cached, _ = count_flops(cached_fn)
        build, _ = count_flops(partial(model.cross_kv, tokens))
        flops[c] = {"no_kv": plain, "kv": cached, "kv_build": build}
    return flops


def bench_rerank(cfg: AlbefConfig, device: torch.device, candidates: tuple[int, ...], reps: int,
                 budget: Budget, ceil: Ceiling) -> dict[str, Any]:  # fmt: skip
    if not budget.allow("rerank: count FLOPs", 10.0):
        return {"rows": []}
    measure = rerank_fn(
        "measure_rerank", {"config", "candidates", "device", "dtype", "kv_cache", "direction", "repeats"}
    )
    t0 = time.perf_counter()
    flops = rerank_flops(cfg, device, candidates)
    create_s = time.perf_counter() - t0  # an upper bound of one model's creation
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for name in ("fp32", "bf16"):
        for c in candidates:
            for kv_cache in (False, True):
                f = flops[c]["kv" if kv_cache else "no_kv"]
                what = f"rerank {name} C={c} {'K/V cache' if kv_cache else 'no cache'}"
                est = 2 * create_s + 3 + (reps + 1) * f / (0.1 * ceil.matmul_flops[name])
                if not budget.allow(what, est):
                    continue
                pps = measure(cfg, c, device, DTYPES[name], kv_cache, direction="t2i", repeats=reps)
                top = ceil.items_per_s(f / c, name)
                rows.append({"dtype": name, "candidates": c, "kv_cache": kv_cache, "pairs_per_s": pps,
                             "flops_per_pair": f / c, "ceiling_pairs_per_s": top, "ceiling_ratio": pps / top})  # fmt: skip
                print(
                    f"  {what:<34} {pps:10.1f} pairs/s  ceiling {top:10.1f}  ratio {pps / top:.2f}",
                    flush=True,
                )
    kv_bytes = 2 * cfg.num_fusion_layers * cfg.num_image_tokens * cfg.hidden_size * 2
    return {
        "model": f"ALBEF ITM rerank ({cfg.num_fusion_layers} fusion layers, {cfg.num_image_tokens} image "
        "tokens), text→image: 1 text × C images, the query's text layers included, image tokens given",
        "measure": "bench/rerank.py measure_rerank (best of `repeats` after a warm-up)",
        "kv_cache": "cross-attention K/V precomputed per image (as if stored), not timed",
        "kv_bytes_per_image_bf16": kv_bytes,
        "flops": {str(c): v for c, v in flops.items()},
        "rows": rows,
    }


def bench_rerank_vs_albef(cfg: AlbefConfig, device: torch.device, candidates: tuple[int, ...], reps: int,
                          budget: Budget, ceil: Ceiling, flops: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """``bench/rerank.py``'s own rows (ALBEF's evaluation loop as the reference, ours, ours + K/V, both
    directions) on this device in bf16: what ``bench/rerank_gpu.sh`` used to run."""
    run_config = rerank_fn("run_config", {"name", "cfg", "candidates", "device", "dtype", "repeats"})
    dtype = "bf16"
    rows: list[dict[str, Any]] = []
    for c in candidates:
        # ~2 directions x 5 timed functions x (repeats + 1), each at most the per-pair path's cost (~2x ours)
        f = 2.0 * (flops or {}).get(str(c), {}).get("no_kv", 0.0)
        if not budget.allow(
            f"rerank vs ALBEF loop {dtype} C={c}", 10 * (reps + 1) * f / (0.1 * ceil.matmul_flops[dtype]) + 10
        ):
            continue
        rows += run_config("base" if cfg.hidden_size == 768 else "toy", cfg, [c], device, DTYPES[dtype], reps)
    return {"precision": dtype, "source": "bench/rerank.py run_config", "rows": rows}


# ---------------------------------------------------------------------------------------------- main
def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="toy sizes (CPU unless --device says otherwise)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --toy)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-<card name>.json)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="hard time budget for the whole run")
    ap.add_argument("--sections", default="vit,rerank,rerank_vs_albef,faiss")
    ap.add_argument("--index-key", default=None, help="override the CPU auto choice (a FAISS factory key)")
    ap.add_argument("--faiss-fake-gpu", action="store_true",
                    help="without a faiss GPU, run the faiss-gpu branch with CPU objects (tests the code path)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - SECTIONS
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from {sorted(SECTIONS)}")
    budget = Budget(args.budget_s, T0)
    faulthandler.dump_traceback_later(max(GRACE_S, budget.left() + GRACE_S), exit=True)  # the hard stop
    if args.threads:
        torch.set_num_threads(args.threads)
    size = TOY if args.toy else FULL
    device = torch.device(args.device or ("cpu" if args.toy else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; "
              "use --toy for a CPU dry run", file=sys.stderr)  # fmt: skip
        return 2
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)
        sync(device)
    cuda_init_s = time.perf_counter() - t0
    card = card_info(device)
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench/results" / f"gpu-{slug(card['name'] if card else 'cpu')}.json"
    )
    load_start = os.getloadavg()
    res: dict[str, Any] = {
        "benchmark": "gpu: ViT build, ALBEF rerank, faiss search, each against the device's measured ceiling",
        "status": "running",
        "toy": args.toy,
        "device": device.type,
        "card": card,
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _run(["git", "rev-parse", "HEAD"]) or os.environ.get("GIT_COMMIT"),
        "machine": machine(),
        "sizes": {k: v for k, v in size.items() if k != "faiss"},
        "ceilings": {},
        "ceiling_detail": {},
        "sections": {},
        "errors": {},
        "budget": {"total_s": args.budget_s, "cuda_init_s": cuda_init_s, "skipped": budget.skipped},
    }

    def save(status: str) -> None:
        res["status"] = status
        res["load"] = {"start": load_start, "end": os.getloadavg()}
        res["budget"]["elapsed_s"] = budget.elapsed()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")

    where = card["name"] if card else res["machine"]["cpu"]
    print(f"device {device} ({where}); budget {args.budget_s:.0f} s", flush=True)
    ceilings: dict[str, Ceiling] = {}
    devices = [device] + ([torch.device("cpu")] if device.type != "cpu" else [])
    for dev in devices:  # the host's own ceiling serves the faiss CPU rows
        n = size["matmul_n"] if dev == device else 2048
        dts = ("fp32", "bf16") if dev == device else ("fp32",)
        c, detail = measure_ceiling(dev, n, size["copy_mib"] if dev == device else 256, dts)
        ceilings[dev.type] = c
        res["ceilings"][dev.type] = {"matmul_flops": c.matmul_flops, "copy_bytes_per_s": c.copy_bytes_per_s}
        res["ceiling_detail"][dev.type] = detail
    save("partial")
    from alignfuse.models.albef.config import get_albef_config

    cfg = get_albef_config(size["albef"])
    res["albef_config"] = size["albef"]
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "vit": lambda: bench_vit(
            cfg, device, size["vit_batches"], size["reps"], size["cap_s"], budget, ceilings[device.type]
        ),  # fmt: skip
        "rerank": lambda: bench_rerank(
            cfg, device, size["candidates"], size["reps"], budget, ceilings[device.type]
        ),
        "rerank_vs_albef": lambda: bench_rerank_vs_albef(
            cfg,
            device,
            size["candidates"],
            size["reps"],
            budget,
            ceilings[device.type],
            res["sections"].get("rerank", {}).get("flops"),
        ),
        "faiss": lambda: run_faiss(
            size["faiss"], device, budget, ceilings, args.faiss_fake_gpu, args.index_key
        ),
    }
    for name in args.sections.split(","):
        print(f"[{name}] at {budget.elapsed():.0f} s", flush=True)
        try:
            res["sections"][name] = sections[name]()
        except Exception as exc:  # one broken section must not lose the others' numbers
            res["errors"][name] = "".join(traceback.format_exception_only(exc)).strip()
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save("partial")
    save("complete" if not res["errors"] else "errors")
    print_table(res)
    print(f"wrote {out}")
    faulthandler.cancel_dump_traceback_later()
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a faiss build still running in the background (over budget) must not hold the exit
