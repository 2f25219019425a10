"""Data sources: where the items of a build come from.

(About 520 lines, over the project's ~450: the three kinds of source share one set of rules, confinement to a
root, record checks and report names, which are easier to keep true in one place.)

Each source yields typed :class:`SourceItem` in a deterministic order. Images are not read here (the
builder hashes and decodes them in DataLoader workers); caption files are parsed here, and malformed records
are reported in :attr:`Source.problems` (never fatal): records that are not valid UTF-8, not JSON, miss a
field or give one of the wrong type, captions over :data:`MAX_CAPTION_CHARS`.

Paths are confined: an image folder yields only files whose real path lies inside the folder, and a
captions/Karpathy file only images inside its image root (``--image-root``, default the file's folder);
``..``, absolute paths and symlinks that lead out are reported, unless ``allow_outside_root``. Reports name
files as the user wrote them (:attr:`SourceItem.display`).

Captioned sources (:class:`CaptionFileSource`, :class:`KarpathySource`) yield, per image, one image item
(``text`` = its first caption, ``metadata["captions"]`` = all of them) followed by one text item per caption
whose ``metadata["image_uri"]`` links it to the image, so both text→image and image→text search work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
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
#: longest caption indexed (the service's default ``limits.max_text_chars``); longer ones are reported
MAX_CAPTION_CHARS = 1000
_OUTSIDE_HINT = "pass --allow-outside-root to index files outside it"


def shown(name: str) -> str:
    """``name`` printable: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


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
    display: str = ""

    @property
    def name(self) -> str:
        """The item as the user wrote it (for reports); its uri when nothing better is known."""
        return self.display or self.uri


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

    Symlinks are resolved: a file or folder whose real path leaves ``root`` is reported and skipped unless
    ``allow_outside_root`` (then followed, each real folder once); symlinked folders inside the tree are not
    followed (their files are reached anyway). File names that are not valid UTF-8 are reported.
    ``metadata`` of each item: ``{"relpath": <path relative to root>}``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        recursive: bool = True,
        allow_outside_root: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotFoundError(f"--images: folder not found: {self.root}")
        self.extensions = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.recursive = recursive
        self.allow_outside_root = allow_outside_root
        self.name = f"images:{self.root}"
        self._problems: list[tuple[str, str]] = []

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems

    def _walk(self) -> list[tuple[str, Path]]:
        """(relative path as found, real path) of every candidate file, confined to the tree."""
        real_root = self.root.resolve()
        seen_dirs = {real_root}
        found: list[tuple[str, Path]] = []
        stack: list[tuple[str, Path]] = [("", self.root)]
        while stack:
            rel_dir, folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                self._problems.append((shown(str(folder)), f"folder unreadable: {exc.strerror or exc}"))
                continue
            for e in entries:
                rel = f"{rel_dir}{e.name}"
                where = shown(f"{self.root}/{rel}")
                try:
                    is_dir = e.is_dir()  # follows symlinks
                except OSError:
                    is_dir = False
                if is_dir:
                    if not self.recursive:
                        continue
                    real = Path(e.path).resolve()
                    if e.is_symlink():
                        if _inside(real, real_root):
                            continue
                        if not self.allow_outside_root:
                            self._problems.append(
                                (
                                    where,
                                    f"symlinked folder leads outside {self.root}: not followed ({_OUTSIDE_HINT})",
                                )
                            )
                            continue
                    if real not in seen_dirs:
                        seen_dirs.add(real)
                        stack.append((f"{rel}/", Path(e.path)))
                    continue
                if Path(e.name).suffix.lower() not in self.extensions:
                    continue
                if shown(rel) != rel:
                    self._problems.append((where, "file name is not valid UTF-8: rename it"))
                    continue
                real = Path(e.path).resolve()
                if e.is_symlink() and not self.allow_outside_root and not _inside(real, real_root):
                    self._problems.append((where, f"symlink leads outside {self.root} ({_OUTSIDE_HINT})"))
                    continue
                found.append((rel, real))
        return sorted(found, key=lambda f: f[0])

    def paths(self) -> list[Path]:
        return [self.root / rel for rel, _ in self._walk()]

    def items(self) -> Iterator[SourceItem]:
        for rel, real in self._walk():
            yield SourceItem(
                kind="image",
                uri=real.as_posix(),
                text=None,
                metadata={"relpath": rel},
                path=real,
                display=f"{self.root}/{rel}",
            )


@dataclass
class _Group:
    image: str
    path: Path
    captions: list[str]
    extra: dict[str, Any]


def _captioned_items(groups: Iterable[_Group]) -> Iterator[SourceItem]:
    for g in groups:
        uri = g.path.as_posix()
        yield SourceItem(
            kind="image",
            uri=uri,
            text=g.captions[0] if g.captions else None,
            metadata={"image": g.image, "captions": list(g.captions), **g.extra},
            path=g.path,
            display=g.image,
        )
        for j, cap in enumerate(g.captions):
            yield SourceItem(
                kind="text",
                uri=f"{uri}#caption{j}",
                text=cap,
                metadata={"image_uri": uri, "image": g.image, "caption_index": j, **g.extra},
                sha256=text_sha256(cap, uri),
                display=f"{g.image}#caption{j}",
            )


def _type_name(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _as_captions(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return [c for c in value if c.strip()]
    return None


def _has_surrogates(value: Any) -> bool:
    """True when a string parsed with ``errors="surrogateescape"`` held bytes that are not UTF-8."""
    return isinstance(value, str) and shown(value) != value


class _GroupingSource:
    """Shared logic: records (image, caption(s), extras) grouped by image in first-appearance order; image
    paths resolved and confined to ``image_root``."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        what: str,
        *,
        allow_outside_root: bool = False,
        max_caption_chars: int = MAX_CAPTION_CHARS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFoundError(f"{what}: file not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if image_root is not None and not self.image_root.is_dir():
            raise NotFoundError(f"--image-root: folder not found: {self.image_root}")
        self.allow_outside_root = allow_outside_root
        self.max_caption_chars = max_caption_chars
        self._problems: list[tuple[str, str]] = []

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems

    def _records(self) -> Iterator[tuple[str, Mapping[str, Any]]]:  # (location, record)
        raise NotImplementedError

    def _image_path(self, where: str, image: Any) -> Path | None:
        """The real path of a record's ``image`` (confined to the image root), or None (reported)."""
        if image is None:
            self._problems.append((where, "missing 'image' field"))
            return None
        if not isinstance(image, str):
            self._problems.append((where, f"'image' must be a string (a file path), got {_type_name(image)}"))
            return None
        if not image.strip():
            self._problems.append((where, "'image' is empty"))
            return None
        if "\x00" in image:
            self._problems.append((where, f"'image' {shown(image)!r} contains a NUL character"))
            return None
        path = Path(image)
        real = (path if path.is_absolute() else self.image_root / path).resolve()
        if not self.allow_outside_root and not _inside(real, self.image_root.resolve()):
            self._problems.append(
                (
                    where,
                    f"image {shown(image)!r} is outside the image root {self.image_root} ({_OUTSIDE_HINT})",
                )
            )
            return None
        return real

    def _captions(self, where: str, rec: Mapping[str, Any]) -> list[str] | None:
        if "caption" not in rec and "captions" not in rec:
            self._problems.append((where, "missing 'caption' field"))
            return None
        value = rec.get("caption", rec.get("captions"))
        caps = _as_captions(value)
        if caps is None:
            self._problems.append(
                (where, f"'caption' must be a string or a list of strings, got {_type_name(value)}")
            )
            return None
        kept = []
        for c in caps:
            if len(c) > self.max_caption_chars:
                self._problems.append(
                    (
                        where,
                        f"caption of {len(c)} characters, over the limit of {self.max_caption_chars}: skipped",
                    )
                )
            else:
                kept.append(c)
        return kept

    def _groups(self) -> list[_Group]:
        groups: dict[str, _Group] = {}
        for where, rec in self._records():
            if any(_has_surrogates(v) for v in rec.values()):
                self._problems.append((where, "not valid UTF-8: record skipped"))
                continue
            caps = self._captions(where, rec)
            path = self._image_path(where, rec.get("image"))
            if caps is None or path is None:
                continue
            image = str(rec["image"])
            extra = {k: v for k, v in rec.items() if k not in ("image", "caption", "captions")}
            key = path.as_posix()
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

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str | Path | None = None,
        allow_outside_root: bool = False,
        max_caption_chars: int = MAX_CAPTION_CHARS,
    ) -> None:
        super().__init__(
            path,
            image_root,
            "--captions",
            allow_outside_root=allow_outside_root,
            max_caption_chars=max_caption_chars,
        )
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
            raise InvalidInputError(
                f"--captions: unsupported file type {suffix!r} (use .jsonl, .csv or .tsv): {self.path}"
            )
        self.format = "jsonl" if suffix in (".jsonl", ".ndjson") else "csv"
        self.name = f"captions:{self.path}"

    def _records(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        if self.format == "jsonl":
            yield from self._jsonl()
        else:
            yield from self._csv()

    def _jsonl(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{self.path}:{n}"
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    self._problems.append(
                        (where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    self._problems.append((where, f"invalid JSON: {exc.msg}"))
                    continue
                if not isinstance(rec, dict):
                    self._problems.append((where, "not a JSON object"))
                    continue
                yield where, rec

    def _csv(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        # undecodable bytes are kept as surrogates and the record is reported in _groups
        with self.path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            fields = [shown(x) for x in reader.fieldnames or []]
            if "image" not in fields or "caption" not in fields:
                raise InvalidInputError(
                    f"--captions: {self.path} needs 'image' and 'caption' columns (has {fields})"
                )
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    self._problems.append((f"{self.path}:{reader.line_num}", f"invalid CSV: {exc}"))
                    continue
                yield f"{self.path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


class KarpathySource(_GroupingSource):
    """The Karpathy-split JSON used by ALBEF/BLIP for COCO and Flickr30K, read by
    :func:`alignfuse.data.karpathy.iter_karpathy`: ``[{"image": "relative/path.jpg", "caption": ["...", ...] or
    "...", ...}, ...]`` (or Karpathy's original ``dataset_*.json``, its ``split`` images); image paths resolve
    against ``image_root`` (default: the JSON file's folder). Extra keys (e.g. ``image_id``) → metadata."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str | Path | None = None,
        split: str = "test",
        allow_outside_root: bool = False,
        max_caption_chars: int = MAX_CAPTION_CHARS,
    ) -> None:
        super().__init__(
            path,
            image_root,
            "--karpathy",
            allow_outside_root=allow_outside_root,
            max_caption_chars=max_caption_chars,
        )
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
            self._texts = []
            for n, raw in enumerate(path.read_bytes().splitlines(), 1):
                try:
                    t = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._problems.append((f"{path}:{n}", "not valid UTF-8"))
                    continue
                if t.strip():
                    self._texts.append((f"{_uri(path)}#L{n}", t))
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
    allow_outside_root: bool = False,
) -> Source:
    """Exactly one of ``images`` / ``captions`` / ``karpathy`` → the matching source (InvalidInputError).
    ``allow_outside_root``: index files whose real path leaves the folder / image root (see the module doc)."""
    given = [n for n, v in (("--images", images), ("--captions", captions), ("--karpathy", karpathy)) if v]
    if len(given) != 1:
        raise InvalidInputError(
            "give exactly one of --images, --captions, --karpathy"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if images is not None:
        if image_root is not None:
            raise InvalidInputError("--image-root only applies to --captions and --karpathy")
        return ImageFolderSource(images, allow_outside_root=allow_outside_root)
    if captions is not None:
        return CaptionFileSource(captions, image_root=image_root, allow_outside_root=allow_outside_root)
    assert karpathy is not None
    return KarpathySource(karpathy, image_root=image_root, allow_outside_root=allow_outside_root)
