"""Open collections: name → handle (opened once, refreshed to newer committed versions), listing, item
rows and thumbnails."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pydantic import ValidationError

from alignfuse.errors import AlignfuseError, InvalidInputError, NotFoundError
from alignfuse.index.collection import Collection, is_collection
from alignfuse.index.manifest import Manifest
from alignfuse.index.types import Item, Modality
from alignfuse.models.base import DualEncoder, ModelInfo

from ..batching import DeviceWorker
from ..images import load_image_file, resolve_uri, thumbnail_jpeg
from ..types import CollectionInfo, ItemInfo, Suggestion, Suggestions
from .handles import Handle, check_collection_name, check_item_id, public_metadata, public_uri
from .lifecycle import EngineBase

log = logging.getLogger(__name__)

SUGGESTIONS_FILE = "suggestions.json"
"""``<collection>/suggestions.json``: ``{"suggestions": [Suggestion, ...]}``, best first."""
MAX_SUGGESTIONS = 50
MAX_SUGGESTIONS_BYTES = 1 << 20


class CollectionsMixin(EngineBase):
    def _handle(self, name: str) -> Handle:
        """The open collection ``name`` (opened on first use, refreshed when a check is due). Blocking I/O."""
        check_collection_name(name)
        self.require_ready()
        assert self.dual is not None
        with self._handles_lock:
            h = self._handles.get(name)
        if h is not None:
            self._maybe_refresh(h)
            return h
        path = self.root / name
        if not is_collection(path):
            raise NotFoundError(f"no collection named {name!r}", detail={"collection": name})
        coll = Collection.open(path, encoder=self._encoder_for(path))
        with self._handles_lock:
            h = self._handles.get(name)
            if h is None:
                h = self._handles[name] = Handle(coll)
            else:
                coll.close()
        return h

    def _encoder_for(self, path: Path) -> ModelInfo:
        """The loaded dual encoder a collection is opened (checked) with: the one of its manifest's spec
        when this server holds it, else the default one (the open then fails with the index's own
        EncoderMismatchError, naming both models), or a 409 naming why that encoder failed to load."""
        assert self.dual is not None
        spec = Manifest.load(path / "manifest.json").encoder.spec
        dual = self.duals.get(spec)
        if dual is not None:
            return dual.info
        if spec in self._dual_errors:
            self.dual_of(spec)  # raises: the collection's encoder could not be loaded, and why
        return self.dual.info

    def dual_for(self, h: Handle) -> tuple[DualEncoder, DeviceWorker]:
        """The dual encoder (and its device worker) that encodes queries and items of ``h``'s collection."""
        return self.dual_of(h.dual_spec)

    def _cached_handle(self, name: str) -> Handle | None:
        """The open handle when no refresh check is due (no I/O: safe on the event loop), else None."""
        h = self._handles.get(name)
        if h is None or self._closed:
            return None
        if time.monotonic() - h.checked >= self.settings.refresh_interval_s:
            return None
        self.require_ready()
        return h

    def _maybe_refresh(self, h: Handle, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - h.checked < self.settings.refresh_interval_s:
            return
        if not h.refresh_lock.acquire(blocking=force):
            return  # another thread is refreshing; serve the committed version we have
        try:
            h.checked = now
            if h.coll.refresh():
                log.info("collection %s now at version %d", h.coll.path.name, h.coll.version)
        finally:
            h.refresh_lock.release()

    @staticmethod
    def _info(name: str, manifest: Manifest, compatible: bool, error: str | None) -> CollectionInfo:
        return CollectionInfo(
            name=name,
            version=manifest.version,
            images=manifest.count("image"),
            texts=manifest.count("text"),
            dim=manifest.dim,
            dual_encoder=manifest.encoder.spec,
            reranker=None if manifest.reranker is None else manifest.reranker.spec,
            index_key=manifest.index_key,
            feature_cache=manifest.features is not None,
            compatible=compatible,
            error=error,
        )

    def list_collections(self) -> list[CollectionInfo]:
        self.require_ready()
        out = []
        for name, manifest in self._manifests():
            try:
                out.append(self.collection_info(name))
            except AlignfuseError as exc:
                out.append(self._info(name, manifest, False, exc.message))
        return out

    def collection_info(self, name: str) -> CollectionInfo:
        h = self._handle(name)
        return self._info(name, h.coll.manifest, True, None)

    def suggestions(self, name: str) -> Suggestions:
        """The queries suggested for collection ``name`` (its ``suggestions.json``, written by ``alignfuse
        demo``); none when it has no such file, or an unreadable one (logged)."""
        h = self._handle(name)
        path = h.coll.path / SUGGESTIONS_FILE
        out: list[Suggestion] = []
        try:
            if path.is_file() and path.stat().st_size <= MAX_SUGGESTIONS_BYTES:
                data = json.loads(path.read_text(encoding="utf-8"))
                rows = data.get("suggestions", []) if isinstance(data, dict) else []
                out = [Suggestion.model_validate(r) for r in rows[:MAX_SUGGESTIONS]]
            elif path.is_file():
                log.warning("ignoring %s: over %d bytes", path, MAX_SUGGESTIONS_BYTES)
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            out = []
        return Suggestions(collection=name, suggestions=out)

    @staticmethod
    def _item_info(it: Item, base: Path) -> ItemInfo:
        return ItemInfo(
            id=it.id,
            kind=it.kind,
            uri=public_uri(it.uri, base),
            caption=it.text,
            metadata=public_metadata(it.metadata, base),
            state=it.state,
            version_added=it.version_added,
        )

    def _live_item(self, name: str, item_id: int) -> tuple[Handle, Item]:
        check_item_id(name, item_id)
        h = self._handle(name)
        it = h.coll.get(int(item_id))
        if it.state != "live":
            raise NotFoundError(f"item {item_id} of {name!r} was deleted", detail={"id": item_id})
        return h, it

    def get_item(self, name: str, item_id: int) -> ItemInfo:
        h, it = self._live_item(name, item_id)
        return self._item_info(it, h.coll.path)

    def list_items(
        self, name: str, *, kind: Modality | None = None, offset: int = 0, limit: int = 100
    ) -> list[ItemInfo]:
        h = self._handle(name)
        return [self._item_info(it, h.coll.path) for it in h.coll.list(kind=kind, offset=offset, limit=limit)]

    def thumbnail(self, name: str, item_id: int, size: int | None = None) -> bytes:
        """A JPEG of an image item's own stored file (its recorded uri), at most ``size`` px per side."""
        lim = self.settings.limits
        size = lim.thumbnail_size if size is None else size
        if not 16 <= size <= 1024:
            raise InvalidInputError("size must be in [16, 1024]", detail={"min": 16, "max": 1024})
        h, it = self._live_item(name, item_id)
        if it.kind != "image":
            raise NotFoundError(
                f"item {item_id} of {name!r} is a text; it has no thumbnail", detail={"id": item_id}
            )
        key = (str(h.coll.path), it.id, it.sha256, size)
        hit = self._thumbs.get(key)
        if hit is not None:
            return hit
        path = resolve_uri(it.uri, h.coll.path)
        img = load_image_file(path, max_pixels=lim.max_pixels, max_bytes=lim.max_request_bytes)
        data = thumbnail_jpeg(img, size)
        self._thumbs.put(key, data)
        return data
