"""Safe image decoding (size and pixel limits before decoding), uri resolution and thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from alignfuse.errors import ImageTooLargeError, NotFoundError, PayloadTooLargeError, UnsupportedMediaError

# Formats we accept (what PIL reports in ``img.format``), and their canonical file extension.
FORMATS: dict[str, str] = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}
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


def check_pixels(img: Image.Image, max_pixels: int, what: str = "image") -> None:
    """Raise ImageTooLargeError when ``img`` (opened lazily, not decoded yet) is over ``max_pixels``."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
            detail={"width": w, "height": h, "pixels": w * h, "max_pixels": max_pixels},
        )
    if w <= 0 or h <= 0:
        raise UnsupportedMediaError(f"{what} has an empty size {w}x{h}")


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode ``data`` into an RGB image.

    The byte size is checked first (PayloadTooLargeError), then the header's width x height against
    ``max_pixels`` *before* any pixel is decoded (ImageTooLargeError: decompression bombs), then the image is
    decoded (UnsupportedMediaError when it is not a readable image).
    """
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"{what} is {len(data)} bytes, over the limit of {max_bytes}",
            detail={"bytes": len(data), "max_bytes": max_bytes},
        )
    if not data:
        raise UnsupportedMediaError(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what} is too large: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UnsupportedMediaError(
            f"{what} is not a decodable image (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from None
    if img.format not in FORMATS:
        raise UnsupportedMediaError(f"{what} has unsupported format {img.format}")
    check_pixels(img, max_pixels, what)
    try:
        img.load()
        upright: Image.Image = ImageOps.exif_transpose(img) or img
        return upright.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what} is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnsupportedMediaError(f"{what} could not be decoded: {exc}") from None


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
