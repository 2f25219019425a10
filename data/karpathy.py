"""The one reader of Karpathy-style JSON (the COCO / Flickr30K splits used by ALBEF and BLIP).

Two layouts are read:

- the ALBEF/BLIP re-packaging, a list of records ``[{"image": "val2014/x.jpg", "caption": "..." | ["...", ...],
  ...}, ...]`` (``coco_test.json``, ``flickr30k_test.json``, the built-in scenes' ``scenes.json``; the training
  files list one caption per record and repeat the image). ``captions`` is accepted for ``caption``; a record
  without either is an image without captions. The scenes add ``group`` (hard-negative group) and ``objects``
  (what was drawn);
- Karpathy's original ``dataset_*.json``: ``{"images": [{"filepath", "filename", "split", "sentences":
  [{"raw", "tokens"}, ...]}, ...]}``, filtered to one ``split``.

A record that cannot be read (not an object, no image path, captions that are not strings) is a *problem*:
reported to ``on_problem(where, what)`` and skipped, or, without ``on_problem``, raised as
:class:`~alignfuse.errors.CorruptDataError`. Captions are returned as written (blank ones included); what to drop
is the caller's policy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignfuse.errors import CorruptDataError, NotFoundError

__all__ = ["KarpathyImage", "iter_karpathy", "read_karpathy"]

#: ``on_problem(where, what)``: ``where`` is ``"<file>[<n>]"`` (or ``"<file>:images[<n>]"``), ``what`` the reason
ProblemFn = Callable[[str, str], None]

_CAPTION_KEYS = ("caption", "captions")
_ORIGINAL_KEYS = ("filepath", "filename", "sentences")


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a split and its captions.

    ``image``: the path as written (relative to an image root the caller chooses). ``group`` / ``objects``: the
    scenes' hard-negative group and drawn objects, when the record has them in the expected form. ``extra``: the
    record's other keys as written (e.g. ``image_id``; ``split``, ``cocoid`` in the original layout), for item
    metadata; ``group`` and ``objects`` are kept there too, as written."""

    image: str
    captions: tuple[str, ...]
    group: int | None = None
    objects: tuple[dict[str, Any], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _load(path: Path) -> Any:
    if not path.is_file():
        raise NotFoundError(f"Karpathy file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptDataError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptDataError(f"cannot read Karpathy file {path}: {exc}") from exc


def _captions(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return tuple(value)
    return None


def _from_list_record(rec: Any) -> KarpathyImage | str:
    """A record of the ALBEF/BLIP layout → the image, or the reason it cannot be read."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    image = rec.get("image")
    if not isinstance(image, str) or not image.strip():
        return "missing 'image' field"
    caps = _captions(next((rec[k] for k in _CAPTION_KEYS if k in rec), None))
    if caps is None:
        return "'caption' must be a string or a list of strings"
    g = rec.get("group")
    objs = rec.get("objects")
    return KarpathyImage(
        image=image,
        captions=caps,
        group=int(g) if isinstance(g, int | float) else None,
        objects=tuple(objs) if isinstance(objs, list) and all(isinstance(o, dict) for o in objs) else None,
        extra={k: v for k, v in rec.items() if k != "image" and k not in _CAPTION_KEYS},
    )


def _from_original_record(rec: dict[str, Any]) -> KarpathyImage | str:
    """A record of Karpathy's ``dataset_*.json`` → the image, or the reason it cannot be read."""
    parts = (rec.get("filepath", ""), rec.get("filename", ""))
    if not all(isinstance(p, str) for p in parts) or not parts[1]:
        return "missing 'filename' field"
    sentences = rec.get("sentences", [])
    if not isinstance(sentences, list):
        return "'sentences' must be a list"
    caps: list[str] = []
    for s in sentences:
        raw = s.get("raw") if isinstance(s, dict) else None
        tokens = s.get("tokens") if isinstance(s, dict) else None
        if isinstance(raw, str):
            caps.append(raw)
        elif isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
            caps.append(" ".join(tokens))
        else:
            return "a sentence has neither a 'raw' string nor a list of 'tokens'"
    return KarpathyImage(
        image="/".join(p for p in parts if p),
        captions=tuple(caps),
        extra={k: v for k, v in rec.items() if k not in _ORIGINAL_KEYS},
    )


def iter_karpathy(
    path: str | Path, *, split: str = "test", on_problem: ProblemFn | None = None
) -> Iterator[tuple[str, KarpathyImage]]:
    """``(where, image)`` per readable record, in file order, *without* merging repeated images (for callers
    with their own grouping, like the index source). Errors and problems as :func:`read_karpathy`."""
    p = Path(path)
    raw = _load(p)

    def problem(where: str, what: str) -> None:
        if on_problem is None:
            raise CorruptDataError(f"{where}: {what}")
        on_problem(where, what)

    if isinstance(raw, dict) and isinstance(raw.get("images"), list):  # Karpathy's original dataset_*.json
        for n, rec in enumerate(raw["images"]):
            where = f"{p}:images[{n}]"
            if not isinstance(rec, dict):
                problem(where, "not a JSON object")
                continue
            if rec.get("split") != split:
                continue
            got = _from_original_record(rec)
            if isinstance(got, str):
                problem(where, got)
            else:
                yield where, got
    elif isinstance(raw, list):  # ALBEF/BLIP re-packaging
        for n, rec in enumerate(raw):
            where = f"{p}[{n}]"
            got = _from_list_record(rec)
            if isinstance(got, str):
                problem(where, got)
            else:
                yield where, got
    else:
        raise CorruptDataError(
            f"{p} must hold a JSON list of records (ALBEF/BLIP layout) or a Karpathy dataset_*.json object "
            "with an 'images' list"
        )


def read_karpathy(
    path: str | Path, *, split: str = "test", on_problem: ProblemFn | None = None
) -> list[KarpathyImage]:
    """The images of a Karpathy-style JSON (either layout; the original one filtered to ``split``), in order
    of first appearance. An image listed more than once (as written) is one entry: its captions appended in
    order, ``group``/``objects`` from its first record, ``extra`` keys from the first record that has them.

    Raises NotFoundError (no such file), CorruptDataError (not JSON, neither layout, or a bad record when
    ``on_problem`` is None). With ``on_problem``, a bad record is reported to it and skipped."""
    merged: dict[str, KarpathyImage] = {}
    for _where, rec in iter_karpathy(path, split=split, on_problem=on_problem):
        first = merged.get(rec.image)
        if first is None:
            merged[rec.image] = rec
        else:
            extra = dict(first.extra)
            for k, v in rec.extra.items():
                extra.setdefault(k, v)
            merged[rec.image] = KarpathyImage(
                first.image, first.captions + rec.captions, first.group, first.objects, extra
            )
    return list(merged.values())
