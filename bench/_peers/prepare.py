"""One model and one image set for every system in ``bench/peers.py``.

- an open_clip ViT-B-32, random init (seed 0), saved as a ``state_dict`` file: clip-retrieval reads it as
  ``open_clip:ViT-B-32/<abs path>`` and alignfuse as ``open_clip:ViT-B-32@<abs path>``;
- a transformers ``CLIPModel`` of the same architecture (random init) saved with ``save_pretrained`` for
  infinity (written by the infinity venv's own Python: see ``make_hf_clip.py``);
- synthetic scenes rendered at ``size`` px (PNG) in an image-only folder, with their captions as text queries.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

from .common import ROOT, Peer, thread_env

log = logging.getLogger("bench.peers")


def make_images(out: Path, count: int, size: int, seed: int = 7) -> tuple[Path, list[str]]:
    """Scenes under ``out/images`` (nothing else in that folder); returns (folder, captions)."""
    from alignfuse.data.scenes import generate_scenes

    js = out / "scenes.json"
    if not js.is_file() or len(json.loads(js.read_text())) != count:
        generate_scenes(out, seed=seed, count=count, size=size)
    entries = json.loads(js.read_text())
    captions = [c for e in entries for c in e["caption"]]
    return out / "images", captions


def save_open_clip(path: Path, arch: str = "ViT-B-32", seed: int = 0) -> Path:
    """A random-init open_clip model's ``state_dict`` (``torch.save``), loadable with ``weights_only``."""
    import open_clip
    import torch

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.rename(path)
    return path


def save_hf_clip(infinity: Peer, out: Path, timeout: float = 600) -> dict[str, object]:
    """The transformers CLIPModel directory for infinity, written by the infinity venv's Python."""
    import open_clip

    if (out / "config.json").is_file() and (out / "vocab.json").is_file():
        return {"dir": str(out), "cached": True}
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    t = time.perf_counter()
    res = subprocess.run(
        [infinity.bin("python"), str(ROOT / "bench" / "_peers" / "make_hf_clip.py"), str(out), str(bpe)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**thread_env(1), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"make_hf_clip.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    info: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    log.info("transformers CLIPModel saved in %.1f s: %s", time.perf_counter() - t, info)
    return info
