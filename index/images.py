"""The one image decoder: encoded bytes → an upright RGB ``PIL.Image``, for every path that reads images (the
builder's DataLoader workers, the API's uploads and queries, thumbnails, rerank inputs).

Order of checks: empty input; the header is parsed lazily (PIL reads sizes without decoding pixels) and its
width x height is checked against ``max_pixels`` *before* any pixel is decoded (decompression bombs in any
format's header); the format must be one of :data:`FORMATS`; then the pixels are decoded, the EXIF orientation
applied, and odd modes brought to 8-bit RGB (16-bit and float greyscale are scaled, not clipped; transparency
is composited over white; an animated image gives its first frame).

Errors are the taxonomy's: :class:`~alignfuse.errors.ImageTooLargeError` (pixel limit) and
:class:`~alignfuse.errors.UnsupportedMediaError` (not a decodable image of an accepted format). Byte-size
limits of uploads are the caller's (the service checks them before reading a body).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alignfuse.errors import ImageTooLargeError, UnsupportedMediaError

#: accepted formats (what PIL reports in ``img.format``) and their canonical file extension
FORMATS: dict[str, str] = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}
#: the default pixel limit of the builder (the service's comes from its settings)
DEFAULT_MAX_PIXELS = 64_000_000

# what PIL raises on corrupt data (struct.error: short reads in some plugins' headers)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, ZeroDivisionError)


def check_pixels(img: Image.Image, max_pixels: int, what: str = "image") -> None:
    """Raise ImageTooLargeError when ``img`` (opened lazily, not decoded yet) is over ``max_pixels``;
    UnsupportedMediaError for an empty size."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{what} is too large: {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
            detail={"width": w, "height": h, "pixels": w * h, "max_pixels": max_pixels},
        )
    if w <= 0 or h <= 0:
        raise UnsupportedMediaError(f"{what} has an empty size {w}x{h}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: high bit depths scaled (``convert`` would clip them to white), alpha
    composited over white (``convert`` would show what lies under transparent pixels)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.int64)
        scale = 257.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        a8 = np.clip(a / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        a8 = ((a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    what: str = "image",
) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image (see the module doc for the checks and their order).

    ``draft_size``: let PIL decode a JPEG at a reduced scale (``Image.draft``) that still covers
    ``draft_size`` x ``draft_size`` (the builder passes the model's input size; the result is then resized
    by the model's transform anyway).
    """
    if not data:
        raise UnsupportedMediaError(f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x its own limit raises) for big images: our own limit decides below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what} is too large: {exc}") from None
    except UnidentifiedImageError:
        raise UnsupportedMediaError(
            f"{what} is not an image in an accepted format (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from None
    except _DECODE_ERRORS as exc:
        raise UnsupportedMediaError(_corrupt(what, exc, "has a corrupt header")) from None
    check_pixels(img, max_pixels, what)
    if img.format not in FORMATS:
        raise UnsupportedMediaError(f"{what} has unsupported format {img.format}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            check_pixels(upright, max_pixels, what)  # a draft or a frame never grows, but be sure
            return _to_rgb(upright)
    except (ImageTooLargeError, UnsupportedMediaError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what} is too large: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise UnsupportedMediaError(_corrupt(what, exc, "could not be decoded")) from None


def _corrupt(what: str, exc: Exception, otherwise: str) -> str:
    msg = str(exc) or type(exc).__name__
    return f"{what} {'is truncated' if 'truncat' in msg.lower() else otherwise}: {msg}"
