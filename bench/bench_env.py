"""Machine, versions, load and commit recorded with every result of the rerank and cost-in-N benchmarks."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def machine_info(device: torch.device | None = None) -> dict[str, object]:
    """Platform, CPU, cores, torch threads, versions (python, torch, faiss, alignfuse), UTC date, git commit
    and the load average at the start (add ``loadavg_end`` when done)."""
    import alignfuse

    try:
        import faiss

        faiss_version = str(faiss.__version__)
    except ImportError:
        faiss_version = "not installed"
    try:
        from importlib.metadata import version

        package = version("alignfuse")
    except Exception:
        package = str(getattr(alignfuse, "__version__", "unknown"))
    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss_version,
        "alignfuse": package,
        "git_commit": git_commit(),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve(path: str) -> Path:
    """A path given relative to the repository root (as recorded in the JSON) → absolute."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p
