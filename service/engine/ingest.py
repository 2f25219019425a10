"""Ingestion: add images and texts (decode, store, encode, commit one version atomically) and delete items.

One write at a time per collection in this process (an asyncio lock per handle); another process holding
the collection's writer lock is a ConflictError from the index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.index.sources import text_sha256
from alignfuse.index.types import NewItem

from ..images import FORMATS, image_format, open_image
from ..types import AddResult, DeleteResult, ImageUpload, TextUpload
from .collections import CollectionsMixin
from .handles import Handle, check_item_id
from .rerank_inputs import RerankInputsMixin

T = TypeVar("T")

UPLOADS_DIR = "uploads"
"""Uploaded image files are stored under ``<collection>/uploads/<sha[:2]>/<sha><ext>``."""


class IngestMixin(CollectionsMixin, RerankInputsMixin):
    async def add_images(self, name: str, uploads: Sequence[ImageUpload]) -> AddResult:
        """Decode, store, encode and commit images atomically (one new version, or nothing)."""
        self.require_ready()
        lim = self.settings.limits
        if not uploads:
            raise InvalidInputError("no images given", detail={"min_items": 1})
        if len(uploads) > lim.max_files_per_upload:
            raise InvalidInputError(
                f"{len(uploads)} images in one request; at most {lim.max_files_per_upload}",
                detail={"max_items": lim.max_files_per_upload},
            )
        for u in uploads:
            if u.caption is not None and len(u.caption) > lim.max_text_chars:
                raise InvalidInputError(
                    f"caption over {lim.max_text_chars} characters", detail={"max_length": lim.max_text_chars}
                )
        h = await self._io(self._handle, name)
        (dual, dual_worker), cross = self.dual_for(h), self.cross
        fc = self._feature_cache(h) if h.coll.manifest.features is not None else None
        want_tokens = fc is not None and self._cross_worker is not None and cross is not None

        def prepare() -> tuple[list[str], list[str], torch.Tensor, torch.Tensor | None]:
            """Decode every upload once: content hashes, formats, and the pixels of both models."""
            imgs: list[Image.Image] = []
            shas, fmts = [], []
            for i, u in enumerate(uploads):
                img = open_image(
                    u.data, max_bytes=lim.max_upload_bytes, max_pixels=lim.max_pixels, what=f"image {i + 1}"
                )
                fmts.append(str(image_format(u.data)))
                imgs.append(img)
                shas.append(hashlib.sha256(u.data).hexdigest())
            pixels = torch.stack([dual.image_transform(im) for im in imgs])
            cpx = torch.stack([cross.image_transform(im) for im in imgs]) if want_tokens and cross else None
            return shas, fmts, pixels, cpx

        shas, fmts, pixels, cross_pixels = await self._io(prepare)
        timeout = lim.request_timeout_s
        vecs = await dual_worker.run("images", pixels, cost=len(uploads), timeout=timeout)
        tokens: np.ndarray | None = None
        if cross_pixels is not None and self._cross_worker is not None:
            tokens = await self._cross_worker.run("tokens", cross_pixels, cost=len(uploads), timeout=timeout)

        def write() -> AddResult:
            up_dir = h.coll.path / UPLOADS_DIR
            new_items: list[NewItem] = []
            for u, sha, fmt in zip(uploads, shas, fmts, strict=True):
                dest = up_dir / sha[:2] / f"{sha}{FORMATS.get(fmt, '.img')}"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(dest.suffix + ".tmp")
                    tmp.write_bytes(u.data)
                    tmp.replace(dest)
                meta = dict(u.metadata)
                if u.filename:
                    meta.setdefault("filename", Path(u.filename).name)
                new_items.append(
                    NewItem(
                        kind="image",
                        uri=dest.relative_to(h.coll.path).as_posix(),
                        sha256=sha,
                        text=u.caption,
                        metadata=meta,
                    )
                )
            return self._commit(h, new_items, vecs, tokens)

        return await self._write(h, write)

    async def add_texts(self, name: str, texts: Sequence[TextUpload]) -> AddResult:
        """Encode and commit texts atomically."""
        self.require_ready()
        lim = self.settings.limits
        if not texts:
            raise InvalidInputError("no texts given", detail={"min_items": 1})
        if len(texts) > lim.max_texts_per_upload:
            raise InvalidInputError(
                f"{len(texts)} texts in one request; at most {lim.max_texts_per_upload}",
                detail={"max_items": lim.max_texts_per_upload},
            )
        for i, t in enumerate(texts):
            if not t.text.strip() or len(t.text) > lim.max_text_chars:
                raise InvalidInputError(
                    f"text {i + 1} is empty or over {lim.max_text_chars} characters",
                    detail={"index": i, "min_length": 1, "max_length": lim.max_text_chars},
                )
        h = await self._io(self._handle, name)
        _, dual_worker = self.dual_for(h)
        vecs = await dual_worker.run(
            "texts", [t.text for t in texts], cost=len(texts), timeout=lim.request_timeout_s
        )
        new_items = [
            NewItem(
                kind="text",
                uri=f"text:{text_sha256(t.text)[:16]}",
                sha256=text_sha256(t.text),
                text=t.text,
                metadata=dict(t.metadata),
            )
            for t in texts
        ]
        return await self._write(h, lambda: self._commit(h, new_items, vecs, None))

    def _commit(
        self, h: Handle, items: list[NewItem], vecs: np.ndarray, tokens: np.ndarray | None
    ) -> AddResult:
        """Stage new items (skipping content already live) and commit once; all or nothing."""
        coll = h.coll
        ids: list[int] = [-1] * len(items)
        with coll.writer() as w:
            known = w.known_sha256([it.sha256 for it in items])
            fresh: list[int] = []
            seen: dict[str, int] = {}
            for i, it in enumerate(items):
                if it.sha256 in known or it.sha256 in seen:
                    continue
                seen[it.sha256] = i
                fresh.append(i)
            if fresh:
                new_ids = w.add(
                    [items[i] for i in fresh], np.ascontiguousarray(vecs[fresh], dtype=np.float32)
                )
                for i, nid in zip(fresh, new_ids.tolist(), strict=True):
                    ids[i] = int(nid)
                if tokens is not None and self.cross is not None:
                    w.put_features(new_ids, tokens[fresh], self.cross.info)
            version = w.commit()
        self._maybe_refresh(h, force=True)
        for i, it in enumerate(items):
            if ids[i] < 0:
                src = seen.get(it.sha256)
                if src is not None and ids[src] >= 0:
                    ids[i] = ids[src]
                else:
                    existing = h.coll.find_by_sha256(it.sha256, it.kind)
                    ids[i] = -1 if existing is None else existing.id
        return AddResult(
            collection=coll.path.name,
            version=version,
            ids=ids,
            added=len(fresh),
            duplicates=len(items) - len(fresh),
        )

    async def delete_item(self, name: str, item_id: int) -> DeleteResult:
        self.require_ready()
        check_item_id(name, item_id)
        h = await self._io(self._handle, name)

        def run() -> DeleteResult:
            it = h.coll.get(int(item_id))  # NotFoundError for an unknown id
            if it.state != "live":
                raise NotFoundError(f"item {item_id} of {name!r} was already deleted", detail={"id": item_id})
            with h.coll.writer() as w:
                w.delete([int(item_id)])
                version = w.commit()
            self._maybe_refresh(h, force=True)
            return DeleteResult(collection=name, version=version, id=int(item_id))

        return await self._write(h, run)

    async def _write(self, h: Handle, fn: Callable[[], T]) -> T:
        """One write at a time per collection in this process; another process's lock is a ConflictError."""
        async with h.write_lock:
            return await self._io(fn)
