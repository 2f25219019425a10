"""Bounded in-memory LRU caches of the engine: recomputed rerank image tokens and thumbnails."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

TokenKey = tuple[str, int, str]
"""(collection path | reranker id, item id, item content sha256)."""
ThumbKey = tuple[str, int, str, int]
"""(collection path, item id, item content sha256, size)."""


class TokenLRU:
    """Recomputed rerank image tokens (fp16, CPU) kept in memory, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[TokenKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: TokenKey) -> torch.Tensor | None:
        with self._lock:
            t = self._data.get(key)
            if t is not None:
                self._data.move_to_end(key)
            return t

    def put(self, key: TokenKey, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._data[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._data:
                _, ev = self._data.popitem(last=False)
                self._bytes -= ev.numel() * ev.element_size()


class ThumbnailLRU:
    """Encoded thumbnails (JPEG bytes), at most ``max_entries`` of them."""

    def __init__(self, max_entries: int = 2048) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[ThumbKey, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: ThumbKey) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: ThumbKey, data: bytes) -> None:
        with self._lock:
            self._data[key] = data
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
