"""Quality and cost of the three retrieval modes on the built-in scenes (issue: offline default acceptance).

For each split (held-out test, seed 3; compositional, seed 4: the seeds of the shipped models' model cards):
generate 1,000 scenes if absent, build a collection with the shipped ALBEF (ITC = dual encoder, rerank cache of
its image tokens), then run ALBEF's protocol (alignfuse.evaluation.evaluate):
  * dual + rerank (top-k_test) on the whole split;
  * dual + rerank + all_pairs on the first ``--all-pairs-limit`` images (default 1000 = the whole split:
    5M cross-encoder forwards, ~16 min per split at 1 thread on this CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_scenes.py --split test
    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_scenes.py --split compositional
    .venv/bin/python bench/eval_scenes.py --report      # table + plot from the JSON files

Writes bench/results/eval_scenes_<split>.json (``--out`` elsewhere; ``--toy``: 40 scenes, all pairs on 10);
``--report`` writes bench/results/eval_scenes.png and prints the markdown table used in docs/benchmarks.md.

Every mode reports ALBEF's protocol numbers (annotated pairs only) and, next to them, truth-aware recall
(``*_true`` keys: a retrieved image counts when it makes the caption true, a retrieved caption when it is true
of the image, judged from the drawn objects by ``caption_matches``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SEEDS = {"test": 3, "compositional": 4}
MODEL = "alignfuse:scenes-albef"


def project_relative(obj: Any) -> Any:
    """``obj`` with every path string under the project root made relative to it (committed results must not
    record the machine that made them)."""
    if isinstance(obj, dict):
        return {k: project_relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [project_relative(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(f"{ROOT}{os.sep}"):
        return os.path.relpath(obj, ROOT)
    return obj


def environment() -> dict[str, Any]:
    """Date, commit, weights, machine, versions and load average for the results JSON."""
    import faiss
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:
        commit: str | None = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from importlib.metadata import version

    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "weights_sha256": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ROOT / "models" / "weights").glob("*.safetensors"))
        },
        "platform": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "alignfuse": version("alignfuse"),
        },
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def run_split(split: str, data: Path, count: int, k_test: int, ap_limit: int, threads: int) -> dict:
    import torch

    from alignfuse.data.scenes import caption_matches, generate_scenes
    from alignfuse.evaluation import evaluate
    from alignfuse.index import BuildOptions, build_collection, open_source
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    torch.set_num_threads(threads)
    env = environment()
    seed = SEEDS[split]
    scenes_dir = data / f"{split}-seed{seed}-n{count}"
    karpathy = scenes_dir / "scenes.json"
    if not karpathy.is_file():
        generate_scenes(scenes_dir, seed=seed, count=count, split=split)
    dual = create_dual_encoder(MODEL)
    cross = create_cross_encoder(MODEL)
    coll = data / "collections" / f"{split}-{seed}-{count}"
    t0 = time.perf_counter()
    build = build_collection(
        coll,
        open_source(karpathy=karpathy, image_root=scenes_dir),
        dual,
        options=BuildOptions(rerank_cache=True, batch_size=128, progress=False),
        cross_encoder=cross,
    )
    build_s = time.perf_counter() - t0
    fusion = cross.info.default_fusion  # what the demo and the service use unless a request says otherwise
    full = evaluate(
        coll,
        karpathy,
        scenes_dir,
        dual,
        cross,
        modes=("dual", "rerank"),
        k_test=k_test,
        batch_size=256,
        fusion=fusion,
        truth=caption_matches,
    )
    sub = evaluate(
        coll,
        karpathy,
        scenes_dir,
        dual,
        cross,
        modes=("dual", "rerank", "all_pairs"),
        k_test=k_test,
        batch_size=512,
        fusion=fusion,
        limit=ap_limit,
        max_all_pairs=ap_limit * ap_limit * 5,
        truth=caption_matches,
    )
    return {
        "split": split,
        "seed": seed,
        "model": MODEL,
        "model_id": dual.info.id,
        "k_test": k_test,
        "fusion": fusion,
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU; torch threads {threads}",
        "build": {"items": build.added + build.skipped_existing, "seconds": round(build_s, 1)},
        "full": full.to_json(),
        "all_pairs_subset": sub.to_json(),
        **env,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


def report(results: Path = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    true_rows: list[str] = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, split in zip(axes, ("test", "compositional"), strict=True):
        path = results / f"eval_scenes_{split}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        for scope, block in (("full", res["full"]), ("subset", res["all_pairs_subset"])):
            n_i, n_t = block["meta"]["n_images"], block["meta"]["n_texts"]
            for mode in ("dual", "rerank", "all_pairs"):
                if mode not in block:
                    continue
                m = block[mode]
                rows.append(
                    f"| {split} | {n_i}×{n_t} | {mode} | {m['tr_r1']:.1f} / {m['tr_r5']:.1f} / {m['tr_r10']:.1f} | "
                    f"{m['ir_r1']:.1f} / {m['ir_r5']:.1f} / {m['ir_r10']:.1f} | {m['r_mean']:.1f} | "
                    f"{100 * m.get('group_acc_t2i', float('nan')):.1f} (chance {100 * m.get('group_acc_t2i_chance', float('nan')):.1f}) | "
                    f"{100 * m.get('group_acc_i2t', float('nan')):.1f} (chance {100 * m.get('group_acc_i2t_chance', float('nan')):.1f}) | "
                    f"{m['encoder_passes']:,} | {m['pair_evals']:,} | {m['seconds']:.1f} |"
                )
                if "tr_r1_true" in m:
                    true_rows.append(
                        f"| {split} | {n_i}×{n_t} | {mode} | {m['tr_r1']:.1f} → {m['tr_r1_true']:.1f} | "
                        f"{m['tr_r5']:.1f} → {m['tr_r5_true']:.1f} | {m['ir_r1']:.1f} → {m['ir_r1_true']:.1f} | "
                        f"{m['ir_r5']:.1f} → {m['ir_r5_true']:.1f} | {m['r_mean']:.1f} → {m['r_mean_true']:.1f} |"
                    )
            if scope == "subset":
                modes = [m for m in ("dual", "rerank", "all_pairs") if m in block]
                x = range(len(modes))
                ax.bar([i - 0.2 for i in x], [block[m]["tr_r1"] for m in modes], 0.4, label="TR@1")
                ax.bar([i + 0.2 for i in x], [block[m]["ir_r1"] for m in modes], 0.4, label="IR@1")
                ax.set_xticks(list(x), [f"{m}\n{block[m]['pair_evals']:,} pairs" for m in modes])
                ax.set_title(f"{split}: {n_i} images × {n_t} captions")
                ax.set_ylabel("R@1 (%)")
                ax.legend()
    fig.suptitle(f"{MODEL}: dual encoder vs ITM rerank vs all pairs (ALBEF protocol)")
    fig.tight_layout()
    fig.savefig(results / "eval_scenes.png", dpi=110)
    print(
        "| split | gallery | mode | TR R@1/5/10 | IR R@1/5/10 | r_mean | group acc t2i | group acc i2t | "
        "encoder passes | pair evals | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if true_rows:
        print(
            "\nTruth-aware recall (ALBEF's protocol → truth-aware: a hit counts when the caption is true of it):\n"
        )
        print("| split | gallery | mode | TR R@1 | TR R@5 | IR R@1 | IR R@5 | r_mean |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(true_rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SEEDS))
    ap.add_argument("--data", type=Path, default=ROOT / "demo-data" / "eval")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--k-test", type=int, default=16)
    ap.add_argument("--all-pairs-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where --report reads and plots")
    ap.add_argument("--card", action="store_true", help="write models/weights/card_metrics.json")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/eval_scenes_<split>.json)")
    ap.add_argument("--toy", action="store_true", help="40 scenes, all pairs on the first 10 (for tests)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.report:
        report(args.results_dir)
        return
    if args.card:
        CARD_FILE.write_text(json.dumps(card_metrics(args.data), indent=1) + "\n")
        logging.info("wrote %s", CARD_FILE)
        return
    if args.split is None:
        ap.error("--split or --report is required")
    if args.toy:
        args.count, args.all_pairs_limit = 40, 10
    res = project_relative(
        run_split(args.split, args.data, args.count, args.k_test, args.all_pairs_limit, args.threads)
    )
    out = args.out or RESULTS / f"eval_scenes_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    logging.info("wrote %s", out)


# ---------------------------------------------------------------------------------------------------------
# The small-subset numbers the model cards quote, recomputed by tests/test_shipped_models.py.
CARD_SUBSET: dict[str, Any] = {"split": "test", "seed": 3, "count": 100, "k_test": 16}
CARD_FILE = ROOT / "models" / "weights" / "card_metrics.json"


def card_metrics(data: Path) -> dict:
    """Metrics of the shipped models on the first 100 held-out test scenes (dual, and ALBEF rerank)."""
    from alignfuse.data.scenes import caption_matches, generate_scenes
    from alignfuse.evaluation import evaluate
    from alignfuse.models.registry import create_cross_encoder, create_dual_encoder

    sub = CARD_SUBSET
    scenes_dir = data / f"card-{sub['split']}-seed{sub['seed']}-n{sub['count']}"
    karpathy = scenes_dir / "scenes.json"
    if not karpathy.is_file():
        generate_scenes(scenes_dir, seed=sub["seed"], count=sub["count"], split=sub["split"])
    cross = create_cross_encoder(MODEL)
    out: dict = {"subset": sub, "fusion": cross.info.default_fusion}
    for spec in ("alignfuse:scenes-albef", "alignfuse:scenes-clip"):
        dual = create_dual_encoder(spec)
        rep = evaluate(
            None,
            karpathy,
            scenes_dir,
            dual,
            cross,
            modes=("dual", "rerank"),
            k_test=sub["k_test"],
            fusion=cross.info.default_fusion,
            truth=caption_matches,
        )
        out[spec] = {"model_id": dual.info.id, **{m: rep.to_json()[m] for m in ("dual", "rerank")}}
    from perception import card_perception

    out["perception"] = card_perception(data / "card-perception")
    return out


if __name__ == "__main__":
    main()
