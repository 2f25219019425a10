"""The item store of a collection: ``items.sqlite`` (one row per item, versioned visibility; WAL mode).

A reader at version v sees a row iff ``version_added <= v`` and treats it as live iff it is not deleted at or
before v (see :mod:`alignfuse.index.collection` for the whole commit protocol).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .types import Item

ITEMS_DB = "items.sqlite"
SQL_CHUNK = 900

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    text TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleted')),
    version_added INTEGER NOT NULL,
    version_deleted INTEGER
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE INDEX IF NOT EXISTS items_kind ON items (kind, id);
CREATE INDEX IF NOT EXISTS items_uri ON items (uri);
CREATE INDEX IF NOT EXISTS items_version_deleted ON items (version_deleted);
"""
COLUMNS = "id, kind, uri, sha256, text, metadata, version_added, version_deleted"
VISIBLE = "version_added <= :v"
LIVE = "version_added <= :v AND (version_deleted IS NULL OR version_deleted > :v)"


def row_to_item(row: tuple[Any, ...], version: int) -> Item:
    vd = row[7] if row[7] is not None and row[7] <= version else None
    return Item(
        id=int(row[0]),
        kind=row[1],
        uri=row[2],
        sha256=row[3],
        text=row[4],
        metadata=json.loads(row[5]) if row[5] else {},
        state="deleted" if vd is not None else "live",
        version_added=int(row[6]),
        version_deleted=vd,
    )


def connect_rw(root: Path) -> sqlite3.Connection:
    db = sqlite3.connect(root / ITEMS_DB, timeout=30.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def connect_ro(root: Path) -> sqlite3.Connection:
    uri = (root / ITEMS_DB).resolve().as_uri() + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
    db.execute("PRAGMA query_only=ON")
    return db


def live_counts(db: sqlite3.Connection, version: int) -> tuple[tuple[str, int], ...]:
    live = dict(db.execute(f"SELECT kind, COUNT(*) FROM items WHERE {LIVE} GROUP BY kind", {"v": version}))
    deleted = db.execute(
        "SELECT COUNT(*) FROM items WHERE version_added <= :v AND version_deleted <= :v", {"v": version}
    ).fetchone()[0]
    return (
        ("image", int(live.get("image", 0))),
        ("text", int(live.get("text", 0))),
        ("deleted", int(deleted)),
    )


def chunks(seq: Sequence[Any], n: int = SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class ShaLookup:
    """Picklable check "is this content hash committed live at ``version``?" that opens its own read-only
    sqlite connection lazily (usable inside DataLoader worker processes)."""

    def __init__(self, root: Path, version: int) -> None:
        self.root = Path(root)
        self.version = version
        self._db: sqlite3.Connection | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "version": self.version, "_db": None, "_pid": -1}

    def known(self, sha256s: Sequence[str]) -> set[str]:
        if self.version <= 0 or not sha256s:
            return set()
        if self._db is None or self._pid != os.getpid():
            self._db = connect_ro(self.root)
            self._pid = os.getpid()
        found: set[str] = set()
        for part in chunks(list(sha256s)):
            q = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT sha256 FROM items WHERE sha256 IN ({q}) AND version_added <= ? "
                "AND (version_deleted IS NULL OR version_deleted > ?)",
                (*part, self.version, self.version),
            )
            found.update(r[0] for r in rows)
        return found
