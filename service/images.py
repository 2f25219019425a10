"""The service side of images: upload byte limits around the one decoder (``alignfuse.index.images``), uri
resolution and thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from alignfuse.errors import NotFoundError, PayloadTooLargeError
from alignfuse.index.images import FORMATS, check_pixels, decode_image

__all__ = [
    "FORMATS",
    "IMAGE_CONTENT_TYPES",
    "check_pixels",
    "image_format",
    "load_image_file",
    "open_image",
    "resolve_uri",
    "thumbnail_jpeg",
]

IMAGE_CONTENT_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
    }
)


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode ``data`` into an upright RGB image: the byte size is checked here (PayloadTooLargeError), the
    rest by the one decoder every path uses, :func:`alignfuse.index.images.decode_image` (pixel limit from
    the header before decoding: ImageTooLargeError; not a readable image of an accepted format:
    UnsupportedMediaError; EXIF orientation applied)."""
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"{what} is {len(data)} bytes, over the limit of {max_bytes}",
            detail={"bytes": len(data), "max_bytes": max_bytes},
        )
    return decode_image(data, max_pixels=max_pixels, what=what)


def image_format(data: bytes) -> str | None:
    """The PIL format name of encoded image bytes (header only), or None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:
        return None


def resolve_uri(uri: str, base: Path) -> Path:
    """The local file an item's uri names: ``file://`` URLs, absolute paths, or paths relative to ``base``
    (the collection directory). NotFoundError for other schemes."""
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise NotFoundError(f"item uri {uri!r} is not a local file")
        path = Path(unquote(parsed.path))
    else:
        path = Path(uri)
    if not path.is_absolute():
        path = base / path
    return path


def load_image_file(path: Path, *, max_pixels: int, max_bytes: int) -> Image.Image:
    """Read a stored image file (a collection's own file) into RGB with the same limits as uploads."""
    try:
        size = path.stat().st_size
    except OSError:
        raise NotFoundError(f"image file {path.name} is missing") from None
    if size > max_bytes:
        raise PayloadTooLargeError(f"image file {path.name} is {size} bytes, over {max_bytes}")
    try:
        data = path.read_bytes()
    except OSError:
        raise NotFoundError(f"image file {path.name} cannot be read") from None
    return open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, what=f"image file {path.name}")


def thumbnail_jpeg(img: Image.Image, size: int, quality: int = 85) -> bytes:
    """A JPEG of ``img`` fitted into ``size`` x ``size`` (aspect kept)."""
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()
