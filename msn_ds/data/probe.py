"""Which image files a loader can read, and how: decided once per file, cheaply.

``probe(data)`` reads the header only (PIL, lazily) and checks the end-of-image marker, so a
healthy 8-bit RGB/grayscale JPEG or PNG costs microseconds. Anything unusual (CMYK, 16-bit,
palette, alpha, other formats, no end marker) is fully decoded with PIL, the torch path's
decoder, which decides: readable files are handed to DALI *transcoded* (decoded by PIL and
converted to RGB exactly as the torch path does, then passed as an uncompressed PPM), so
both loaders see the same pixels; unreadable ones are skipped by both.
"""
from __future__ import annotations

import io
import os
import stat
from typing import NamedTuple

import numpy as np
from PIL import Image

RAW, TRANSCODE, BAD = 1, 2, 3  # 0: not probed yet

_DALI_SAFE = {"JPEG": {"RGB", "L"}, "PNG": {"RGB", "L"}}


class Probe(NamedTuple):
    status: int
    height: int = 0
    width: int = 0
    reason: str = ""


def read_regular(path: str) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file *before* reading: opened
    non-blocking, so a FIFO (or a file replaced by one after listing) raises ``OSError`` at
    once instead of blocking the reader forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def decode_rgb(data: bytes) -> Image.Image:
    """The torch path's decode (``load_rgb``) on bytes."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _complete(data: bytes, fmt: str) -> bool:
    """Ends with the format's end marker (a truncated file does not)."""
    if fmt == "JPEG":
        return b"\xff\xd9" in data[-64:]
    if fmt == "PNG":
        return b"IEND" in data[-16:]
    return False


def probe(data: bytes) -> Probe:
    if not data:
        return Probe(BAD, reason="empty file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt, mode, (w, h) = img.format, img.mode, img.size
    except Exception as e:  # not an image, corrupt header
        return Probe(BAD, reason=f"{type(e).__name__}: {e}")
    safe = mode in _DALI_SAFE.get(fmt, ()) and _complete(data, fmt)
    if fmt == "PNG" and len(data) > 24 and data[24] != 8:  # IHDR bit depth (16-bit RGB is "RGB")
        safe = False
    if safe:
        return Probe(RAW, h, w)
    try:
        rgb = decode_rgb(data)
    except Exception as e:  # truncated, corrupt body
        return Probe(BAD, reason=f"{type(e).__name__}: {e}")
    return Probe(TRANSCODE, rgb.height, rgb.width, reason=f"{fmt} {mode}")


def to_ppm(img: Image.Image) -> bytes:
    """Uncompressed PPM (P6) of an RGB image: the cheapest container DALI decodes."""
    arr = np.asarray(img, dtype=np.uint8)
    return b"P6\n%d %d\n255\n" % (arr.shape[1], arr.shape[0]) + arr.tobytes()
