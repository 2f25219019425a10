"""WebDataset tar shards (the format img2dataset writes) as a build source for ``--engine ray``.

A shard is a plain tar whose members are grouped into samples by key (the member name up to the first dot of
its base name): ``000123.jpg`` (or png/webp), ``000123.txt`` (the caption), ``000123.json`` (metadata). The
driver reads only the tar headers and the small text/json members; images stay in the tar and are read by
offset in the Ray tasks (:func:`read_member`), hashed and decoded by the one decoder, so an image gets the
same content key as the same file in an image folder.

Each sample yields an image item (uri ``<tar>#<member>``, ``text`` = the caption, ``metadata`` = ``{"key",
"shard", "captions", **json}``) and, when it has a caption, a text item linked to it (as
:mod:`alignfuse.index.sources` does for caption files).
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignfuse.errors import InvalidInputError, NotFoundError

from .sources import SourceItem, text_sha256

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_MAX_SIDECAR = 1 << 20  # caption/json members larger than this are reported, not read


@dataclass(frozen=True)
class TarMember:
    """Where an image's bytes are inside a tar (read by offset, no extraction)."""

    tar: str
    offset: int
    size: int


def read_member(ref: TarMember) -> bytes:
    with open(ref.tar, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.size)


class WebDatasetSource:
    """Samples of every ``*.tar`` under ``path`` (or of the tar ``path``), in shard and member order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            self.tars = [self.path]
        elif self.path.is_dir():
            self.tars = sorted(self.path.glob("*.tar"))
            if not self.tars:
                raise InvalidInputError(f"--webdataset: no .tar shards in {self.path}")
        else:
            raise NotFoundError(f"--webdataset: not found: {self.path}")
        self.name = f"webdataset:{self.path}"
        self._problems: list[tuple[str, str]] = []
        #: image uri → where its bytes are (filled by :meth:`items`)
        self.members: dict[str, TarMember] = {}

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems

    def items(self) -> Iterator[SourceItem]:
        for tar_path in self.tars:
            yield from self._shard(tar_path.resolve())

    def _shard(self, tar_path: Path) -> Iterator[SourceItem]:
        try:
            tf = tarfile.open(tar_path, mode="r:")  # noqa: SIM115 (closed by the with below)
        except (OSError, tarfile.TarError) as exc:
            self._problems.append((str(tar_path), f"not a readable tar: {exc}"))
            return
        with tf:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key = f"{m.name[: len(m.name) - len(base)]}{stem}"
                samples.setdefault(key, {})[ext.lower()] = m
            for key, parts in samples.items():
                image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
                where = f"{tar_path}#{key}"
                if image is None:
                    self._problems.append((where, "sample has no image (jpg, jpeg, png, webp)"))
                    continue
                caption = self._text(tf, parts.get("txt"), where)
                extra = self._json(tf, parts.get("json"), where)
                uri = f"{tar_path.as_posix()}#{image.name}"
                self.members[uri] = TarMember(str(tar_path), image.offset_data, image.size)
                caps = [caption] if caption else []
                meta = {**extra, "key": key, "shard": tar_path.name, "captions": caps}
                yield SourceItem(kind="image", uri=uri, text=caption or None, metadata=meta)
                if caption:
                    yield SourceItem(
                        kind="text",
                        uri=f"{uri}#caption0",
                        text=caption,
                        metadata={"image_uri": uri, "key": key, "caption_index": 0},
                        sha256=text_sha256(caption, uri),
                    )

    def _read_small(self, tf: tarfile.TarFile, m: tarfile.TarInfo, where: str) -> bytes | None:
        if m.size > _MAX_SIDECAR:
            self._problems.append((f"{where}: {m.name}", f"larger than {_MAX_SIDECAR} bytes: ignored"))
            return None
        f = tf.extractfile(m)
        return f.read() if f is not None else None

    def _text(self, tf: tarfile.TarFile, m: tarfile.TarInfo | None, where: str) -> str:
        raw = self._read_small(tf, m, where) if m is not None else None
        if raw is None:
            return ""
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._problems.append((f"{where}: {m.name if m else ''}", "caption is not UTF-8: ignored"))
            return ""

    def _json(self, tf: tarfile.TarFile, m: tarfile.TarInfo | None, where: str) -> dict[str, Any]:
        raw = self._read_small(tf, m, where) if m is not None else None
        if raw is None:
            return {}
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._problems.append((f"{where}: {m.name if m else ''}", "invalid JSON: ignored"))
            return {}
        if not isinstance(value, dict):
            return {}
        return {k: v for k, v in value.items() if k not in ("key", "shard", "captions")}
