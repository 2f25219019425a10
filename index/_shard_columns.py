"""Column and array helpers of :mod:`alignfuse.index.shards` (reading clip-retrieval's files)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignfuse.errors import CorruptDataError, InvalidInputError

if TYPE_CHECKING:
    import pyarrow as pa

#: unit-norm check on import (fp16 embeddings are within ~1e-3)
NORM_TOLERANCE = 1e-2


def column(table: pa.Table, name: str) -> list[Any] | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def uri_sha256(uri: str) -> str:
    return hashlib.sha256(b"uri\0" + uri.encode("utf-8")).hexdigest()


def read_vectors(path: Path, rows: int, dim: int | None, renormalize: bool) -> np.ndarray:
    """A shard's ``.npy`` embeddings as float32, shape, dimension and unit norm checked."""
    try:
        v = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CorruptDataError(f"{path}: not a .npy array: {exc}") from exc
    if v.ndim != 2 or v.shape[0] != rows:
        raise InvalidInputError(f"{path}: expected {rows} rows of vectors, got shape {v.shape}")
    if dim is not None and v.shape[1] != dim:
        raise InvalidInputError(
            f"--model: {path} holds {v.shape[1]}-d embeddings but the model (and collection) is {dim}-d: "
            "name the model that made them"
        )
    out = np.asarray(v, dtype=np.float32)
    if rows:
        norms = np.linalg.norm(out, axis=1)
        if not np.isfinite(out).all():
            raise InvalidInputError(f"{path}: embeddings contain NaN or inf")
        worst = float(np.abs(norms - 1.0).max())
        if worst > NORM_TOLERANCE and not renormalize:
            raise InvalidInputError(
                f"{path}: embeddings are not L2-normalised (|norm - 1| up to {worst:.3g}); "
                "pass --renormalize to normalise them"
            )
    return out


#: columns read_shard interprets; any other metadata column (clip-retrieval flattens the source's metadata
#: JSON into columns: url, key, width, ...) is kept in the item's metadata
_KNOWN_COLUMNS = {"image_path", "uri", "sha256", "caption", "metadata"}


def extra_columns(meta: pa.Table) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name in meta.column_names:
        if name in _KNOWN_COLUMNS:
            continue
        values = meta.column(name).to_pylist()
        # JSON-safe scalars only (nested or binary columns are left out)
        if all(v is None or isinstance(v, str | int | float | bool) for v in values):
            out[name] = values
    return out
