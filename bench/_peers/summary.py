"""The summary of ``bench/peers.py``: medians over repeats, ratios first, the targets met or missed."""

from __future__ import annotations

import statistics
from typing import Any


def _med(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(res: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    bc = res["build"]["cells"]
    af_b = _med([c["images_per_s"] for c in bc if c["system"] == "alignfuse"])
    cr_b = _med([c["images_per_s"] for c in bc if c["system"] == "clip-retrieval"])
    s["build"] = {
        "ratio_alignfuse_over_clip_retrieval": _ratio(af_b, cr_b),
        "alignfuse_images_per_s": af_b,
        "clip-retrieval_images_per_s": cr_b,
        # each tool's own account of its encoding loop (after start-up; clip-retrieval: after its warm-up batch)
        "steady_ratio_alignfuse_over_clip_retrieval": _ratio(
            _med([c.get("reported_images_per_s") for c in bc if c["system"] == "alignfuse"]),
            _med([c.get("reported_images_per_s") for c in bc if c["system"] == "clip-retrieval"]),
        ),
        "alignfuse_reported_images_per_s": _med(
            [c.get("reported_images_per_s") for c in bc if c["system"] == "alignfuse"]
        ),
        "clip-retrieval_reported_images_per_s": _med(
            [c.get("reported_images_per_s") for c in bc if c["system"] == "clip-retrieval"]
        ),
        "target": "alignfuse >= 1.0x clip-retrieval images/s",
        "target_met": None if cr_b is None or af_b is None else af_b >= cr_b,
    }
    rows = []
    sc = res["search"]["cells"]
    for conc in concurrency:
        row: dict[str, Any] = {"concurrency": conc}
        for name, key in (("alignfuse", "alignfuse"), ("clip-retrieval", "clip_back")):
            cs = [c for c in sc if c["system"] == name and c["concurrency"] == conc]
            row[f"{key}_rps"] = _med([c["throughput_rps"] for c in cs])
            row[f"{key}_p50_ms"] = _med([c["p50_ms"] for c in cs])
            row[f"{key}_p99_ms"] = _med([c["p99_ms"] for c in cs])
            row[f"{key}_errors"] = sum(c["errors"] for c in cs) if cs else None
        row["qps_ratio"] = _ratio(row["alignfuse_rps"], row["clip_back_rps"])
        row["p99_ratio"] = _ratio(row["alignfuse_p99_ms"], row["clip_back_p99_ms"])
        rows.append(row)
    top = rows[-1] if rows else {}
    met = None
    if top.get("qps_ratio") is not None and top.get("p99_ratio") is not None:
        met = bool(top["qps_ratio"] >= 2.0 and top["p99_ratio"] < 1.0)
    s["search"] = {
        "qps_ratio_at_top_concurrency": top.get("qps_ratio"),
        "p99_ratio_at_top_concurrency": top.get("p99_ratio"),
        "target": f"alignfuse >= 2x clip-back QPS at concurrency {max(concurrency)} with a lower p99",
        "target_met": met,
        "by_concurrency": rows,
    }
    ec = res["embed"]["cells"]
    e: dict[str, Any] = {}
    for name in ("alignfuse", "infinity"):
        for mod in ("image", "text"):
            e[f"{name}_{mod}s_per_s"] = _med([c.get(f"{mod}s_per_s") for c in ec if c["system"] == name])
    e["image_ratio_alignfuse_over_infinity"] = _ratio(e["alignfuse_images_per_s"], e["infinity_images_per_s"])
    e["text_ratio_alignfuse_over_infinity"] = _ratio(e["alignfuse_texts_per_s"], e["infinity_texts_per_s"])
    s["embed"] = dict(sorted(e.items(), key=lambda kv: not kv[0].endswith("over_infinity")))
    return s
