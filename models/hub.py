"""Weights on disk: checksums, caches, and failing fast when a download cannot happen.

No environment is read here (only ``service`` reads settings); callers pass cache directories explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from alignfuse.errors import ModelUnavailableError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "alignfuse"


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """sha256 of a file, memoised in a sidecar ``<file>.sha256.json`` keyed by size and mtime."""
    p = Path(path)
    st = p.stat()
    sidecar = p.with_name(p.name + ".sha256.json")
    try:
        memo = json.loads(sidecar.read_text())
        if memo.get("size") == st.st_size and memo.get("mtime_ns") == st.st_mtime_ns:
            return str(memo["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # read-only location: fine, just slower next time
        sidecar.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    return digest


def sha256_state_dict(state: dict[str, object]) -> str:
    """Checksum of tensors' bytes in key order (for random-init models: identical seeds give identical ids)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def host_reachable(url_or_host: str, *, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host (port 443/80) opens within ``timeout`` seconds."""
    parsed = urlparse(url_or_host if "://" in url_or_host else f"https://{url_or_host}")
    host = parsed.hostname or url_or_host
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """Whether huggingface_hub was started in offline mode (HF_HUB_OFFLINE set before Python started)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - hub missing
        return False


def require_download(spec: str, url: str, *, hint: str, timeout: float = 3.0) -> None:
    """Raise ModelUnavailableError within ``timeout`` seconds when ``url`` cannot be downloaded now."""
    if hub_offline() and "huggingface" in url:
        raise ModelUnavailableError(
            f"{spec}: weights are not in the local cache and HF_HUB_OFFLINE is set. {hint}"
        )
    if not host_reachable(url, timeout=timeout):
        host = urlparse(url if "://" in url else f"https://{url}").hostname
        raise ModelUnavailableError(
            f"{spec}: weights are not in the local cache and {host} cannot be reached (offline?). {hint}"
        )
