"""The figure of ``bench/peers.py``: build images/s, search QPS and p99 by concurrency, embedding throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"alignfuse": "#4f7cff", "clip-retrieval": "#ff7a59", "infinity": "#2ca58d"}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    summ = results["summary"]

    ax = axes[0]
    b = summ.get("build", {})
    names = [n for n in ("alignfuse", "clip-retrieval") if b.get(f"{n}_images_per_s") is not None]
    ax.bar(names, [b[f"{n}_images_per_s"] for n in names], color=[COLOURS[n] for n in names])
    if not names:
        ax.text(
            0.5, 0.5, "build not run in this invocation", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"build: images/s, end to end ({results['images']['count']} images)")
    ax.set_ylabel("images / s")

    s = summ.get("search", {}).get("by_concurrency", [])
    for system, key in (("alignfuse", "alignfuse"), ("clip-retrieval", "clip_back")):
        pts = [(c["concurrency"], c.get(f"{key}_rps"), c.get(f"{key}_p99_ms")) for c in s]
        pts = [p for p in pts if p[1] is not None]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        axes[1].plot(xs, [p[1] for p in pts], marker="o", color=COLOURS[system], label=system)
        axes[2].plot(xs, [p[2] for p in pts], marker="o", color=COLOURS[system], label=system)
    for ax, title, ylabel in ((axes[1], "search throughput", "queries / s"), (axes[2], "search p99", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["config"]["concurrency"])
        ax.set_xticklabels([str(c) for c in results["config"]["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")

    ax = axes[3]
    e = summ.get("embed", {})
    labels, vals, cols = [], [], []
    for system in ("alignfuse", "infinity"):
        for mod in ("image", "text"):
            v = e.get(f"{system}_{mod}s_per_s")
            if v is not None:
                labels.append(f"{system}\n{mod}s")
                vals.append(v)
                cols.append(COLOURS[system])
    ax.bar(labels, vals, color=cols)
    ax.set_title("embedding throughput (ViT-B-32)")
    ax.set_ylabel("items / s")
    m = results["machine"]
    fig.suptitle(
        f"alignfuse vs clip-retrieval and infinity: same ViT-B-32 (random init), same images, "
        f"{results['config']['threads']} torch threads each; {m['cpus']} CPUs, load {m['loadavg_start']} → "
        f"{m['loadavg_end']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
