"""The builder's loading stage: a torch ``Dataset`` that reads, hashes, decodes (the one decoder,
:func:`alignfuse.index.images.decode_image`) and transforms each source item in DataLoader worker processes,
the batches it yields, the deterministic spans a build is cut into, and the workers' start-up (they close the
parent's lock and die with the parent)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from alignfuse.errors import AlignfuseError
from alignfuse.models.base import ImageTransform

from ._fs import close_inherited_lock
from .images import decode_image
from .sources import SourceItem, text_sha256
from .store import ShaLookup

if TYPE_CHECKING:
    from .builder import BuildOptions


@dataclass
class _Record:
    index: int
    kind: str
    status: str  # ok | skipped | failed
    sha256: str = ""
    reason: str = ""
    pixels: tuple[torch.Tensor, ...] = ()


@dataclass
class _Batch:
    records: list[_Record]
    pixels: tuple[torch.Tensor, ...]  # per transform: [n_ok_images, 3, H, W] in record order


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ItemDataset(Dataset[_Record]):
    """Reads, hashes, decodes and transforms one source item (in a DataLoader worker process)."""

    def __init__(
        self,
        items: Sequence[SourceItem],
        transforms: Sequence[ImageTransform],
        draft_size: int,
        lookup: ShaLookup,
        options: BuildOptions,
    ) -> None:
        self.items = list(items)
        self.transforms = list(transforms)
        self.draft_size = draft_size
        self.lookup = lookup
        self.draft = options.draft
        self.max_pixels = options.max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> _Record:
        it = self.items[i]
        if it.kind == "text":
            return _Record(i, "text", "ok", sha256=it.sha256 or text_sha256(it.text or ""))
        if it.path is None:
            return _Record(i, "image", "failed", reason="no path")
        try:
            data = it.path.read_bytes()
        except FileNotFoundError:
            return _Record(i, "image", "failed", reason="file not found")
        except OSError as exc:
            return _Record(i, "image", "failed", reason=f"unreadable: {exc.strerror or exc}")
        if not data:
            return _Record(i, "image", "failed", reason="empty file (0 bytes)")
        sha = _sha256_bytes(data)
        if self.lookup.known([sha]):
            return _Record(i, "image", "skipped", sha256=sha)
        try:
            img = decode_image(
                data,
                max_pixels=self.max_pixels,
                draft_size=self.draft_size if self.draft else None,
                what="file",
            )
        except AlignfuseError as exc:
            return _Record(i, "image", "failed", sha, exc.message)
        try:
            pixels = tuple(t(img) for t in self.transforms)
        except Exception as exc:  # a transform failing on one odd image must not stop the build
            return _Record(i, "image", "failed", sha, f"transform failed: {exc}")
        return _Record(i, "image", "ok", sha, pixels=pixels)


def _collate(records: list[_Record]) -> _Batch:
    with_pixels = [r for r in records if r.pixels]
    stacked: tuple[torch.Tensor, ...] = ()
    if with_pixels:
        stacked = tuple(
            torch.stack([r.pixels[j] for r in with_pixels]) for j in range(len(with_pixels[0].pixels))
        )
    for r in records:
        r.pixels = ()
    return _Batch(records, stacked)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), then check the parent did not
    die already. The signal follows the parent *thread* that forked: DataLoader workers are forked by the
    thread iterating the loader, which outlives them."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_init(lock_fd: int | None, parent_pid: int, _: int) -> None:
    _die_with_parent(parent_pid)
    torch.set_num_threads(1)
    close_inherited_lock(lock_fd)  # a SIGKILLed build must not leave its lock held by its workers


def _spans(items: Sequence[SourceItem], images_per_batch: int, max_items: int) -> list[list[int]]:
    """Contiguous spans of source indices holding ``images_per_batch`` images (captions ride along with
    their image), capped at ``max_items`` items. Deterministic: a resumed build sees the same spans."""
    spans: list[list[int]] = []
    cur: list[int] = []
    n_img = 0
    for i, it in enumerate(items):
        if it.kind == "image" and (n_img >= images_per_batch or len(cur) >= max_items):
            spans.append(cur)
            cur, n_img = [], 0
        elif it.kind == "text" and len(cur) >= max_items and n_img == 0:
            spans.append(cur)
            cur = []
        cur.append(i)
        n_img += it.kind == "image"
    if cur:
        spans.append(cur)
    return spans
