"""What a request may name (collection names: plain folder names, never a path; item ids) and the open
collection a name resolves to (:class:`Handle`)."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from alignfuse.errors import AlignfuseError, NotFoundError
from alignfuse.index.collection import Collection, is_collection
from alignfuse.index.manifest import Manifest

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_item_id(name: str, item_id: int) -> int:
    """Item ids are int64 >= 0; anything else cannot exist."""
    if not isinstance(item_id, int) or not 0 <= item_id < 2**63:
        raise NotFoundError(f"no item {item_id} in {name!r}", detail={"id": str(item_id)})
    return item_id


def check_collection_name(name: str) -> str:
    """Collection names are plain folder names (no separators, no leading dot): never a path."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise NotFoundError(f"no collection named {name!r}", detail={"collection": name})
    return name


def scan_manifests(root: Path) -> list[tuple[str, Manifest]]:
    """(name, manifest) of every collection folder directly under ``root``; unreadable ones are skipped."""
    out: list[tuple[str, Manifest]] = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.is_dir() and is_collection(p) and NAME_RE.match(p.name):
            try:
                out.append((p.name, Manifest.load(p / "manifest.json")))
            except (AlignfuseError, OSError) as exc:
                log.warning("skipping collection %s: %s", p.name, exc)
    return out


class Handle:
    """An open collection, the spec of the dual encoder that built it (and encodes its queries), when it
    last checked for a newer committed version, and its locks."""

    def __init__(self, coll: Collection) -> None:
        self.coll = coll
        self.dual_spec = coll.manifest.encoder.spec
        self.checked = time.monotonic()
        self.refresh_lock = threading.Lock()
        self.write_lock = asyncio.Lock()


def public_uri(uri: str, base: Path) -> str:
    """What a response says about where an item came from, without the server's file system.

    Files inside the collection folder (uploads) are named relative to it (``uploads/ab/<sha>.png``); local
    files outside it (the images a build indexed) by their file name only (``000001.png``); a fragment
    (``#caption2``) is kept; ``text:`` ids and non-file URLs are unchanged. The stored uri (what the
    thumbnail endpoint and the reranker read) stays on the server."""
    head, sep, fragment = uri.partition("#")
    if "://" in head:
        if not head.startswith("file://"):
            return uri
        head = unquote(urlparse(head).path)
    elif not head.startswith("/"):
        return uri  # already relative (to the collection) or an id such as text:<hash>
    path = PurePosixPath(head)
    try:
        shown = path.relative_to(base.resolve().as_posix()).as_posix()
    except ValueError:
        shown = path.name
    return f"{shown}{sep}{fragment}"


def public_metadata(metadata: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The item's metadata as a response shows it: the link a caption keeps to its image
    (``image_uri``) is a public uri too."""
    out = dict(metadata)
    link = out.get("image_uri")
    if isinstance(link, str):
        out["image_uri"] = public_uri(link, base)
    return out
