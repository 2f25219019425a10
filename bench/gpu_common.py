"""Shared pieces of ``bench/gpu.py``: the time budget, timing (CUDA events on a GPU), the measured ceilings
(matmul FLOP/s per dtype, copy bandwidth) and the roofline that turns them into items/s, FLOP counting."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Budget:
    """A hard time budget for the whole run, counted from ``start`` (a ``perf_counter`` taken before the
    heavy imports: CUDA init and faiss-gpu transfers included). A step asks :meth:`allow` with its estimate;
    what would overrun is skipped and recorded."""

    total_s: float
    start: float
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allow(self, what: str, estimate_s: float) -> bool:
        if estimate_s <= self.left():
            return True
        self.skip(what, f"needs ~{estimate_s:.1f} s, {self.left():.1f} s of the budget left", estimate_s)
        return False

    def skip(self, what: str, reason: str, estimate_s: float | None = None) -> None:
        self.skipped.append(
            {"what": what, "reason": reason, "estimate_s": estimate_s, "at_s": round(self.elapsed(), 1)}
        )
        print(f"[skipped] {what}: {reason}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, reps: int, cap_s: float) -> list[float]:
    """Seconds per call of ``fn`` (warmed up by the caller): up to ``reps`` calls, stopping once ``cap_s``
    has passed (at least one call). CUDA events around each call on a GPU, ``perf_counter`` on the CPU."""
    out: list[float] = []
    stop = time.perf_counter() + cap_s
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        if time.perf_counter() > stop:
            break
    return out


def summary(times: list[float]) -> dict[str, float | int]:
    return {"median_s": statistics.median(times), "best_s": min(times), "calls": len(times)}


@dataclass(frozen=True)
class Ceiling:
    """What one device can do, measured: dense matmul FLOP/s per dtype and device-to-device copy bytes/s
    (read + write)."""

    device: str
    matmul_flops: dict[str, float]
    copy_bytes_per_s: float

    def items_per_s(self, flops: float, dtype: str, bytes_moved: float = 0.0) -> float:
        """Roofline ceiling for an item costing ``flops`` (at ``dtype``'s matmul rate) and ``bytes_moved``
        (at the copy bandwidth): 1 / max(compute time, memory time)."""
        t = max(flops / self.matmul_flops[dtype], bytes_moved / self.copy_bytes_per_s)
        return 1.0 / t if t > 0 else float("inf")


def measure_ceiling(
    device: torch.device, n: int, copy_mib: int, dtypes: tuple[str, ...] = ("fp32", "bf16"), reps: int = 10
) -> tuple[Ceiling, dict[str, Any]]:
    """Time an ``n``×``n``×``n`` matmul per dtype (best of ``reps`` after 3 warm-ups) and a ``copy_mib`` MiB
    tensor copy on ``device``."""
    rates: dict[str, float] = {}
    detail: dict[str, Any] = {"matmul_n": n, "copy_mib": copy_mib}
    g = torch.Generator(device=device).manual_seed(0)
    for name in dtypes:
        dtype = DTYPES[name]
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        c = torch.empty_like(a)

        def mm(a: torch.Tensor = a, b: torch.Tensor = b, c: torch.Tensor = c) -> None:
            torch.mm(a, b, out=c)

        for _ in range(3):
            mm()
        sync(device)
        times = time_calls(mm, device, reps, cap_s=10.0)
        rates[name] = 2.0 * n**3 / min(times)
        detail[f"matmul_{name}"] = summary(times)
    bw = _copy_rate(device, copy_mib, reps, detail)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        detail["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        detail["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    detail["torch_threads"] = torch.get_num_threads()
    return Ceiling(str(device), rates, bw), detail


def _copy_rate(device: torch.device, mib: int, reps: int, detail: dict[str, Any]) -> float:
    """Bytes/s (read + write) of a ``mib`` MiB float32 tensor copy on ``device``."""
    x = torch.ones(mib * (1 << 18), device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    times = time_calls(lambda: y.copy_(x), device, reps, cap_s=5.0)
    detail["copy"] = summary(times)
    return 2.0 * x.numel() * 4 / min(times)


def count_flops(fn: Callable[[], object]) -> tuple[float, dict[str, int]]:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``), attention forced onto the math backend so
    its matmuls are counted on every device (the fused CPU kernel has no FLOP formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    ops = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), ops


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{'section':<8} {'item':<46} {'measured':>10} {'ceiling':>10} {'ratio':>6}")
    for dev, c in res["ceilings"].items():
        for dt, rate in c["matmul_flops"].items():
            print(f"{'ceiling':<8} {dev + ' matmul ' + dt + ' FLOP/s':<46} {fmt_rate(rate):>10}")
        print(f"{'ceiling':<8} {dev + ' copy bytes/s':<46} {fmt_rate(c['copy_bytes_per_s']):>10}")
    sec = res["sections"]
    for r in sec.get("vit", {}).get("rows", []):
        item = f"{r['dtype']} batch {r['batch']} images/s"
        print(
            f"{'vit':<8} {item:<46} {r['images_per_s']:>10.1f} {r['ceiling_images_per_s']:>10.1f} {r['ceiling_ratio']:>6.2f}"
        )
    for r in sec.get("rerank", {}).get("rows", []):
        item = f"{r['dtype']} C={r['candidates']} {'K/V cache' if r['kv_cache'] else 'no cache'} pairs/s"
        print(
            f"{'rerank':<8} {item:<46} {r['pairs_per_s']:>10.1f} {r['ceiling_pairs_per_s']:>10.1f} {r['ceiling_ratio']:>6.2f}"
        )
    for r in sec.get("rerank_vs_albef", {}).get("rows", []):
        item = f"bf16 {r.get('direction')} C={r.get('candidates')}: ours, ours+K/V x vs ALBEF loop"
        print(
            f"{'rerank':<8} {item:<46} {r.get('speedup_ours', 0):>10.2f} {r.get('speedup_ours_kv', 0):>10.2f}"
        )
    for r in sec.get("faiss", {}).get("rows", []):
        for b in (1, 64):
            q, top = r.get(f"qps_b{b}"), r.get(f"ceiling_qps_b{b}")
            item = f"{r['engine'][:34]} {r['device']} b{b} q/s"
            ratio = f"{q / top:>6.3f}" if q and top else f"{'-':>6}"
            print(
                f"{'faiss':<8} {item:<46} {q or 0:>10.1f} {top or 0:>10.1f} {ratio}  recall@10 {r['recall_at_10']:.3f}"
            )
    for s in res["budget"]["skipped"]:
        print(f"skipped: {s['what']}: {s['reason']}")
    print(f"total {res['budget']['elapsed_s']:.0f} s of {res['budget']['total_s']:.0f} s")
