"""Data sources: where the items of a build come from.

Each source yields typed :class:`SourceItem` in a deterministic order. Images are not read here (the
builder hashes and decodes them in DataLoader workers); caption files are parsed here, and malformed records
are reported in :attr:`Source.problems` (never fatal).

Captioned sources (:class:`CaptionFileSource`, :class:`KarpathySource`) yield, per image, one image item
(``text`` = its first caption, ``metadata["captions"]`` = all of them) followed by one text item per caption
whose ``metadata["image_uri"]`` links it to the image, so both text→image and image→text search work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignfuse.data.karpathy import iter_karpathy
from alignfuse.errors import CorruptDataError, InvalidInputError, NotFoundError

from .types import Kind

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)


def text_sha256(text: str, image_uri: str | None = None) -> str:
    """Content hash of a text item: its text and, for a caption, the image it describes."""
    h = hashlib.sha256(b"text\0")
    h.update(text.encode("utf-8"))
    if image_uri is not None:
        h.update(b"\0image\0")
        h.update(image_uri.encode("utf-8"))
    return h.hexdigest()


@dataclass(frozen=True)
class SourceItem:
    """One item to index. Image items have ``path`` (their sha256 is computed from the file bytes when
    read); text items have ``text`` and a precomputed ``sha256``."""

    kind: Kind
    uri: str
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None


@runtime_checkable
class Source(Protocol):
    """Anything that yields :class:`SourceItem` and collects (location, reason) problems."""

    name: str

    def items(self) -> Iterator[SourceItem]: ...

    @property
    def problems(self) -> list[tuple[str, str]]: ...


def _uri(path: Path) -> str:
    return path.resolve().as_posix()


class ImageFolderSource:
    """Every image file under ``root`` (recursive; by extension, case-insensitive), sorted by relative path.

    ``metadata`` of each item: ``{"relpath": <path relative to root>}``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        recursive: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotFoundError(f"--images: folder not found: {self.root}")
        self.extensions = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.recursive = recursive
        self.name = f"images:{self.root}"
        self._problems: list[tuple[str, str]] = []

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems

    def paths(self) -> list[Path]:
        it = self.root.rglob("*") if self.recursive else self.root.iterdir()
        found = [p for p in it if p.suffix.lower() in self.extensions and not p.is_dir()]
        return sorted(found, key=lambda p: p.relative_to(self.root).as_posix())

    def items(self) -> Iterator[SourceItem]:
        for p in self.paths():
            yield SourceItem(
                kind="image",
                uri=_uri(p),
                text=None,
                metadata={"relpath": p.relative_to(self.root).as_posix()},
                path=p,
            )


@dataclass
class _Group:
    image: str
    path: Path
    captions: list[str]
    extra: dict[str, Any]


def _captioned_items(groups: Iterable[_Group]) -> Iterator[SourceItem]:
    for g in groups:
        uri = _uri(g.path)
        yield SourceItem(
            kind="image",
            uri=uri,
            text=g.captions[0] if g.captions else None,
            metadata={"image": g.image, "captions": list(g.captions), **g.extra},
            path=g.path,
        )
        for j, cap in enumerate(g.captions):
            yield SourceItem(
                kind="text",
                uri=f"{uri}#caption{j}",
                text=cap,
                metadata={"image_uri": uri, "image": g.image, "caption_index": j, **g.extra},
                sha256=text_sha256(cap, uri),
            )


def _as_captions(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return [c for c in value if c.strip()]
    return None


class _GroupingSource:
    """Shared logic: records (image, caption(s), extras) grouped by image in first-appearance order."""

    def __init__(self, path: str | Path, image_root: str | Path | None, what: str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFoundError(f"{what}: file not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if image_root is not None and not self.image_root.is_dir():
            raise NotFoundError(f"--image-root: folder not found: {self.image_root}")
        self._problems: list[tuple[str, str]] = []

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems

    def _records(self) -> Iterator[tuple[str, Mapping[str, Any]]]:  # (location, record)
        raise NotImplementedError

    def _groups(self) -> list[_Group]:
        groups: dict[str, _Group] = {}
        for where, rec in self._records():
            image = rec.get("image")
            caps = _as_captions(rec.get("caption", rec.get("captions")))
            if not isinstance(image, str) or not image.strip():
                self._problems.append((where, "missing 'image' field"))
                continue
            if caps is None:
                self._problems.append((where, "'caption' must be a string or a list of strings"))
                continue
            extra = {k: v for k, v in rec.items() if k not in ("image", "caption", "captions")}
            path = Path(image)
            if not path.is_absolute():
                path = self.image_root / path
            key = path.resolve().as_posix()
            g = groups.get(key)
            if g is None:
                groups[key] = _Group(image=image, path=path, captions=list(caps), extra=dict(extra))
            else:
                g.captions.extend(c for c in caps if c not in g.captions)
                for k, v in extra.items():
                    g.extra.setdefault(k, v)
        return list(groups.values())

    def items(self) -> Iterator[SourceItem]:
        yield from _captioned_items(self._groups())


class CaptionFileSource(_GroupingSource):
    """A captions file: JSON Lines (``.jsonl``) or CSV (``.csv``/``.tsv``) with columns ``image`` and
    ``caption`` (a string; in JSONL also a list), optional extra columns → metadata. Relative image paths
    resolve against ``image_root`` or else the file's folder. Lines naming the same image are grouped."""

    def __init__(self, path: str | Path, *, image_root: str | Path | None = None) -> None:
        super().__init__(path, image_root, "--captions")
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
            raise InvalidInputError(
                f"--captions: unsupported file type {suffix!r} (use .jsonl, .csv or .tsv): {self.path}"
            )
        self.format = "jsonl" if suffix in (".jsonl", ".ndjson") else "csv"
        self.name = f"captions:{self.path}"

    def _records(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        if self.format == "jsonl":
            with self.path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{self.path}:{n}"
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        self._problems.append((where, f"invalid JSON: {exc.msg}"))
                        continue
                    if not isinstance(rec, dict):
                        self._problems.append((where, "not a JSON object"))
                        continue
                    yield where, rec
        else:
            delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
            with self.path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                fields = reader.fieldnames or []
                if "image" not in fields or "caption" not in fields:
                    raise InvalidInputError(
                        f"--captions: {self.path} needs 'image' and 'caption' columns (has {fields})"
                    )
                for n, row in enumerate(reader, 2):
                    yield f"{self.path}:{n}", {k: v for k, v in row.items() if k is not None}


class KarpathySource(_GroupingSource):
    """The Karpathy-split JSON used by ALBEF/BLIP for COCO and Flickr30K, read by
    :func:`alignfuse.data.karpathy.iter_karpathy`: ``[{"image": "relative/path.jpg", "caption": ["...", ...] or
    "...", ...}, ...]`` (or Karpathy's original ``dataset_*.json``, its ``split`` images); image paths resolve
    against ``image_root`` (default: the JSON file's folder). Extra keys (e.g. ``image_id``) → metadata."""

    def __init__(
        self, path: str | Path, *, image_root: str | Path | None = None, split: str = "test"
    ) -> None:
        super().__init__(path, image_root, "--karpathy")
        self.split = split
        self.name = f"karpathy:{self.path}"

    def _records(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        def report(where: str, what: str) -> None:
            self._problems.append((where, what))

        try:
            # records are not merged here: _groups merges by resolved path and drops repeated captions
            for where, rec in iter_karpathy(self.path, split=self.split, on_problem=report):
                yield where, {**rec.extra, "image": rec.image, "caption": list(rec.captions)}
        except CorruptDataError as exc:  # the whole file (not JSON, neither layout): a usage error here
            raise InvalidInputError(f"--karpathy: {exc.message}") from exc


class TextSource:
    """Plain texts (no images): a sequence of strings, or a UTF-8 file with one text per line."""

    def __init__(self, texts: Sequence[str] | str | Path, *, name: str | None = None) -> None:
        self._problems: list[tuple[str, str]] = []
        if isinstance(texts, str | Path):
            path = Path(texts)
            if not path.is_file():
                raise NotFoundError(f"--texts: file not found: {path}")
            lines = path.read_text(encoding="utf-8").splitlines()
            self._texts = [(f"{_uri(path)}#L{n}", t) for n, t in enumerate(lines, 1) if t.strip()]
            self.name = name or f"texts:{path}"
        else:
            self.name = name or "texts"
            self._texts = [(f"text:{text_sha256(t)[:16]}", t) for t in texts if t.strip()]

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems

    def items(self) -> Iterator[SourceItem]:
        for uri, t in self._texts:
            yield SourceItem(kind="text", uri=uri, text=t, metadata={}, sha256=text_sha256(t))


def open_source(
    *,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    karpathy: str | Path | None = None,
    image_root: str | Path | None = None,
) -> Source:
    """Exactly one of ``images`` / ``captions`` / ``karpathy`` → the matching source (InvalidInputError)."""
    given = [n for n, v in (("--images", images), ("--captions", captions), ("--karpathy", karpathy)) if v]
    if len(given) != 1:
        raise InvalidInputError(
            "give exactly one of --images, --captions, --karpathy"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if images is not None:
        if image_root is not None:
            raise InvalidInputError("--image-root only applies to --captions and --karpathy")
        return ImageFolderSource(images)
    if captions is not None:
        return CaptionFileSource(captions, image_root=image_root)
    assert karpathy is not None
    return KarpathySource(karpathy, image_root=image_root)
