"""A hostile corpus, generated: images a careless user or an attacker hands the builder (odd modes,
truncated/zero-byte/mislabelled files, decompression bombs in five formats' headers, symlinks, odd names)
and a captions file with every kind of bad record. Each entry says whether it must be indexed or refused.

Importable by other tests (``from tests.index.hostile import ...``)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import draw_image

BOMB_SIDE = 40_000  # 1.6e9 pixels in the header: far over any pixel limit, a few hundred bytes on disk


@dataclass(frozen=True)
class Entry:
    name: str  # relative to the corpus folder, as the user would name it
    ok: bool  # must be indexed (True) or reported and skipped (False)
    why: str  # what it is


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid PNG whose header claims ``side`` x ``side`` RGB pixels (a few zlib'd rows of data)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side * 3 + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb(side: int = 60_000) -> bytes:
    """A small real JPEG whose SOF0 marker is patched to ``side`` x ``side`` (max 65535)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def gif_bomb(side: int = 65_535) -> bytes:
    """A small GIF whose logical screen and image descriptor both claim ``side`` x ``side``."""
    buf = io.BytesIO()
    Image.new("P", (4, 4), 1).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", side, side)
    j = data.index(b"\x2c")  # image descriptor
    data[j + 5 : j + 9] = struct.pack("<HH", side, side)
    return bytes(data)


def webp_bomb() -> bytes:
    """A lossless WebP whose VP8L header claims 16384 x 16384 (the format's maximum)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    j = data.index(b"VP8L") + 8
    assert data[j] == 0x2F
    bits = int.from_bytes(data[j + 1 : j + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | 16383 | (16383 << 14)
    data[j + 1 : j + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def tiff_bomb(side: int = BOMB_SIDE) -> bytes:
    """An uncompressed greyscale TIFF whose IFD claims ``side`` x ``side`` (one short strip of data)."""
    entries = [
        (256, 4, 1, side),  # ImageWidth LONG
        (257, 4, 1, side),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample SHORT
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 0),  # StripOffsets (patched below)
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, side),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd_off = 8
    data_off = ifd_off + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_off) + struct.pack("<H", len(entries)))
    for tag, typ, count, value in entries:
        if tag == 273:
            value = data_off
        packed = struct.pack("<I", value) if typ == 4 else struct.pack("<HH", value, 0)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0) + b"\x80" * 16
    return bytes(out)


def exif_rotated_jpeg(path: Path) -> Path:
    """A JPEG stored sideways (48 wide, 64 high) with EXIF orientation 6: upright it is 64 x 48."""
    img = Image.new("RGB", (64, 48), (250, 250, 250))
    img.paste((200, 0, 0), (0, 0, 20, 48))  # red band on the left when upright
    stored = img.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


def make_hostile_images(root: Path, outside: Path) -> list[Entry]:
    """Write the hostile image folder under ``root`` (and a secret file under ``outside``)."""
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []

    def put(name: str, data: bytes, ok: bool, why: str) -> None:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        entries.append(Entry(name, ok, why))

    def save(name: str, img: Image.Image, fmt: str, ok: bool, why: str, **kw: object) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        put(name, buf.getvalue(), ok, why)

    for i in range(4):
        draw_image(root / f"good{i}.jpg", seed=100 + i)
        entries.append(Entry(f"good{i}.jpg", True, "ordinary JPEG"))
    exif_rotated_jpeg(root / "rotated.jpg")
    entries.append(Entry("rotated.jpg", True, "EXIF orientation 6"))
    save("cmyk.jpg", Image.new("CMYK", (40, 30), (0, 200, 100, 20)), "JPEG", True, "CMYK JPEG")
    grad = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    save("deep16.png", Image.fromarray(grad), "PNG", True, "16-bit greyscale PNG")
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (8, 8, 24, 24))
    save("palette_alpha.png", pal, "PNG", True, "palette + transparency", transparency=0)
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    put("animated.gif", buf.getvalue(), True, "animated GIF")
    save("one_pixel.png", Image.new("RGB", (1, 1), (9, 9, 9)), "PNG", True, "1x1")
    save("la.png", Image.new("LA", (16, 16), (100, 128)), "PNG", True, "grey + alpha")
    png = io.BytesIO()
    Image.new("RGB", (24, 24), (0, 90, 200)).save(png, "PNG")
    put("mislabelled_png.jpg", png.getvalue(), True, "a PNG named .jpg")
    put("name with spaces & 'quotes'.png", _png(7), True, "odd file name")
    put("ünïcødé 图像.png", _png(8), True, "unicode file name")
    put("-rf.png", _png(9), True, "leading dash")
    put("newline\nname.png", _png(10), True, "newline in the name")
    # bad ones
    good = (root / "good0.jpg").read_bytes()
    put("truncated.jpg", good[: len(good) // 2], False, "truncated JPEG")
    put("zero.png", b"", False, "zero bytes")
    put("text_as.png", b"hello, I am not a picture\n" * 4, False, "text named .png")
    put("bomb.png", png_bomb(), False, "PNG bomb")
    put("bomb.jpg", jpeg_bomb(), False, "JPEG bomb")
    put("bomb.gif", gif_bomb(), False, "GIF bomb")
    put("bomb.webp", webp_bomb(), False, "WebP bomb")
    put("bomb.tif", tiff_bomb(), False, "TIFF bomb")
    # a file name that is not valid UTF-8 (Linux allows any bytes but / and NUL)
    raw = os.fsencode(root) + b"/bad_\xff_name.png"
    with open(raw, "wb") as f:
        f.write(_png(11))
    entries.append(Entry(os.fsdecode(b"bad_\xff_name.png"), False, "name not valid UTF-8"))
    # symlinks: out of the tree (refused), dangling (refused), into the tree (a duplicate: skipped as known)
    secret = outside / "secret.png"
    secret.write_bytes(_png(12))
    (root / "escape.png").symlink_to(secret)
    entries.append(Entry("escape.png", False, "symlink out of the tree"))
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    entries.append(Entry("dangling.png", False, "dangling symlink"))
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    entries.append(Entry("outdir", False, "symlinked folder out of the tree"))
    return entries


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_hostile_captions(folder: Path, outside: Path) -> tuple[Path, int, list[str]]:
    """A captions file in ``folder`` (its images next to it) with good records and every kind of bad one.

    Returns (captions file, number of good images, substrings the report must contain)."""
    imgs = folder / "imgs"
    for i in range(3):
        draw_image(imgs / f"ok{i}.png", seed=200 + i)
    (imgs / "notimage.png").write_bytes(b"GIF89a but not really")
    (imgs / "bomb.png").write_bytes(png_bomb())
    outside.mkdir(parents=True, exist_ok=True)
    draw_image(outside / "secret.png", seed=300)
    (imgs / "link_out.png").symlink_to(outside / "secret.png")
    depth = len(folder.resolve().parts)
    escape = "../" * depth + outside.resolve().as_posix().lstrip("/") + "/secret.png"
    lines: list[bytes] = [
        json.dumps({"image": "imgs/ok0.png", "caption": ["a good caption", "another one"]}).encode(),
        b'{"image": "imgs/ok1.png", "caption": "bad byte \xff here"}',
        json.dumps({"image": "imgs/ok1.png", "caption": "ok1 caption"}).encode(),
        json.dumps({"image": 42, "caption": "x"}).encode(),
        json.dumps({"caption": "no image at all"}).encode(),
        json.dumps({"image": "imgs/ok2.png"}).encode(),
        json.dumps({"image": "imgs/ok2.png", "caption": "ok2 caption"}).encode(),
        json.dumps({"image": "imgs/missing.png", "caption": "caption of a missing file"}).encode(),
        json.dumps({"image": "imgs/notimage.png", "caption": "caption of a non-image"}).encode(),
        json.dumps({"image": "imgs/bomb.png", "caption": "caption of a bomb"}).encode(),
        json.dumps({"image": escape, "caption": "climbing out"}).encode(),
        json.dumps({"image": (outside / "secret.png").resolve().as_posix(), "caption": "absolute"}).encode(),
        json.dumps({"image": "imgs/link_out.png", "caption": "through a symlink"}).encode(),
        json.dumps({"image": "imgs/ok0.png", "caption": "x" * 100_000}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        b"{truncated json",
    ]
    path = folder / "caps.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    must_report = [
        f"{path}:2",  # non-UTF-8 line
        "UTF-8",
        "'image' must be a string",
        "missing 'image'",
        "missing 'caption'",
        "imgs/missing.png",
        "imgs/notimage.png",
        "imgs/bomb.png",
        escape,  # as the user wrote it
        "outside",
        "imgs/link_out.png",
        "100000 characters",
        "not a JSON object",
        "invalid JSON",
    ]
    return path, 3, must_report
